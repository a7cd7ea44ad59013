// A tiny SVG plot writer: one plot per document, with axes, ticks, grid, polylines, markers,
// text and a legend beside the plot. Data coordinates in, pixels out; either axis may be
// logarithmic. Everything drawn at data coordinates is clipped to the plot area.
//
//   fo::demo::SvgPlot plot(720, 450, {0, 30}, {1e-3, 3, /*log=*/true});
//   plot.axes("epoch", "train loss", "softmax regression");
//   plot.polyline({{0, 2.3}, {1, 0.5}, {2, 0.3}}, fo::demo::svg_color(0), 2,
//   fo::demo::svg_dash(0)); plot.legend({{"adam", fo::demo::svg_color(0), fo::demo::svg_dash(0)}});
//   plot.save("loss.svg");
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace fo::demo {

struct Range {
  double lo = 0;
  double hi = 1;
  bool log = false;  // log10 scale; then lo > 0
};

struct Point {
  double x = 0;
  double y = 0;
};

struct LegendEntry {
  std::string label;
  std::string color;
  std::string dash = "";  // the line's stroke-dasharray ("" solid)
  bool marker = false;    // the line has markers (SvgPlot::marker) at its points
};

/// The i-th of 10 distinguishable colors (cycling).
const char* svg_color(std::size_t i);
/// The i-th of 7 dash patterns (cycling; the first is "", solid), a stroke-dasharray: lines
/// that run together stay told apart by more than their colour.
const char* svg_dash(std::size_t i);

class SvgPlot {
 public:
  /// Throws std::invalid_argument for an empty or reversed range, or a log range with lo <= 0.
  SvgPlot(double width, double height, Range x, Range y);

  /// Frame, grid, ticks with labels, the axis labels and an optional title above the plot.
  void axes(const std::string& x_label, const std::string& y_label, const std::string& title = "");
  /// Clipped to the plot area. A point that is not finite (or <= 0 on a log axis) breaks the
  /// line there, so a diverging run draws up to where it diverged.
  /// `dash` is a stroke-dasharray, "" for a solid line.
  void polyline(const std::vector<Point>& points, const std::string& color, double width = 1.5,
                const std::string& dash = "");
  /// A filled circle of `radius` pixels at a data point.
  void marker(Point at, const std::string& color, double radius = 3);
  /// Text at a data point; anchor is "start", "middle" or "end".
  void text(Point at, const std::string& s, double size = 12, const std::string& anchor = "start",
            const std::string& color = "#222");
  /// A boxed legend, one line per entry, in a column right of the plot area (the document
  /// widens to hold it), so that it never covers data.
  void legend(const std::vector<LegendEntry>& entries);

  /// Where a data point lands, in pixels of the document.
  Point to_pixel(Point data) const;

  std::string str() const;
  /// Writes str() to `path`; throws std::runtime_error if that fails.
  void save(const std::string& path) const;

 private:
  double px(double x) const;
  double py(double y) const;

  double width_, height_;
  Range x_, y_;
  double left_, right_, top_, bottom_;  // the plot area, in pixels
  double legend_right_ = 0;             // the legend's right edge, 0 without one
  std::string body_;
};

}  // namespace fo::demo
