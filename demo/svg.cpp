// SVG text is built with snprintf in the C locale's number format: "%.2f", never a comma.
#include "svg.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace fo::demo {

namespace {

std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // Control characters are not allowed in XML 1.0 text (tab and newline are).
        if (static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n') out += c;
    }
  }
  return out;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

// Pixel coordinates far outside the document are clamped: the clip path hides them anyway,
// and renderers choke on 1e30.
double clamp_px(double v) { return std::clamp(v, -1e5, 1e5); }

struct Tick {
  double value;
  std::string label;
};

std::string fixed(double v, int decimals) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", std::max(decimals, 0), v);
  return buf;
}

// About five ticks at 1, 2 or 5 times a power of ten, labelled without float noise.
std::vector<Tick> linear_ticks(double lo, double hi) {
  const double raw = (hi - lo) / 5;
  const int e = static_cast<int>(std::floor(std::log10(raw)));
  const double base = std::pow(10.0, e);
  const double m = raw / base;
  const double mant = m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10;
  const double step = mant * base;
  const int decimals = mant == 10 ? -e - 1 : -e;
  std::vector<Tick> ticks;
  for (double k = std::ceil(lo / step - 1e-9); k * step <= hi + 1e-9 * step; k += 1) {
    const double v = k * step;
    ticks.push_back({v, fixed(v == 0 ? 0.0 : v, decimals)});
  }
  return ticks;
}

// Decades, and 2x and 5x marks when the range spans at most three of them.
std::vector<Tick> log_ticks(double lo, double hi) {
  const int e0 = static_cast<int>(std::floor(std::log10(lo)));
  const int e1 = static_cast<int>(std::ceil(std::log10(hi)));
  const bool fine = e1 - e0 <= 3;
  std::vector<Tick> ticks;
  for (int e = e0; e <= e1; ++e)
    for (double mant : {1.0, 2.0, 5.0}) {
      if (mant != 1 && !fine) continue;
      const double v = mant * std::pow(10.0, e);
      if (v < lo * (1 - 1e-9) || v > hi * (1 + 1e-9)) continue;
      std::string label;
      if (e >= -4 && e <= 5) {
        label = fixed(v, -e);
      } else {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%ge%d", mant, e);
        label = buf;
      }
      ticks.push_back({v, label});
    }
  return ticks;
}

void check_range(const Range& r, const char* which) {
  if (!(std::isfinite(r.lo) && std::isfinite(r.hi) && r.lo < r.hi) || (r.log && r.lo <= 0))
    throw std::invalid_argument(std::string("SvgPlot: bad ") + which + " range");
}

}  // namespace

const char* svg_color(std::size_t i) {
  // Tableau 10: distinguishable, and readable on white.
  static const char* const colors[] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                       "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};
  return colors[i % 10];
}

const char* svg_dash(std::size_t i) {
  static const char* const dashes[] = {"", "8 4", "2 3", "10 3 2 3", "5 5", "12 3 3 3 3 3", "1 4"};
  return dashes[i % 7];
}

SvgPlot::SvgPlot(double width, double height, Range x, Range y)
    : width_(width), height_(height), x_(x), y_(y) {
  check_range(x_, "x");
  check_range(y_, "y");
  left_ = 72;
  right_ = width_ - 16;
  top_ = 36;
  bottom_ = height_ - 48;
  if (!(right_ > left_ + 10 && bottom_ > top_ + 10))
    throw std::invalid_argument("SvgPlot: the document is too small for a plot");
}

double SvgPlot::px(double x) const {
  const double t =
      x_.log ? (std::log10(x) - std::log10(x_.lo)) / (std::log10(x_.hi) - std::log10(x_.lo))
             : (x - x_.lo) / (x_.hi - x_.lo);
  return left_ + t * (right_ - left_);
}

double SvgPlot::py(double y) const {
  const double t =
      y_.log ? (std::log10(y) - std::log10(y_.lo)) / (std::log10(y_.hi) - std::log10(y_.lo))
             : (y - y_.lo) / (y_.hi - y_.lo);
  return bottom_ - t * (bottom_ - top_);
}

Point SvgPlot::to_pixel(Point data) const { return {px(data.x), py(data.y)}; }

void SvgPlot::axes(const std::string& x_label, const std::string& y_label,
                   const std::string& title) {
  std::string s = "<g font-size=\"11\" fill=\"#444\">\n";
  for (const Tick& t : x_.log ? log_ticks(x_.lo, x_.hi) : linear_ticks(x_.lo, x_.hi)) {
    const std::string x = num(px(t.value));
    s += "<line x1=\"" + x + "\" y1=\"" + num(top_) + "\" x2=\"" + x + "\" y2=\"" + num(bottom_) +
         "\" stroke=\"#e6e6e6\"/>\n";
    s += "<line x1=\"" + x + "\" y1=\"" + num(bottom_) + "\" x2=\"" + x + "\" y2=\"" +
         num(bottom_ + 5) + "\" stroke=\"#444\"/>\n";
    s += "<text x=\"" + x + "\" y=\"" + num(bottom_ + 18) + "\" text-anchor=\"middle\">" +
         escape(t.label) + "</text>\n";
  }
  for (const Tick& t : y_.log ? log_ticks(y_.lo, y_.hi) : linear_ticks(y_.lo, y_.hi)) {
    const std::string y = num(py(t.value));
    s += "<line x1=\"" + num(left_) + "\" y1=\"" + y + "\" x2=\"" + num(right_) + "\" y2=\"" + y +
         "\" stroke=\"#e6e6e6\"/>\n";
    s += "<line x1=\"" + num(left_ - 5) + "\" y1=\"" + y + "\" x2=\"" + num(left_) + "\" y2=\"" +
         y + "\" stroke=\"#444\"/>\n";
    s += "<text x=\"" + num(left_ - 8) + "\" y=\"" + num(py(t.value) + 4) +
         "\" text-anchor=\"end\">" + escape(t.label) + "</text>\n";
  }
  s += "</g>\n";
  s += "<rect x=\"" + num(left_) + "\" y=\"" + num(top_) + "\" width=\"" + num(right_ - left_) +
       "\" height=\"" + num(bottom_ - top_) + "\" fill=\"none\" stroke=\"#444\"/>\n";
  s += "<text x=\"" + num((left_ + right_) / 2) + "\" y=\"" + num(height_ - 10) +
       "\" font-size=\"13\" text-anchor=\"middle\" fill=\"#222\">" + escape(x_label) + "</text>\n";
  const std::string cy = num((top_ + bottom_) / 2);
  s += "<text x=\"16\" y=\"" + cy + "\" font-size=\"13\" text-anchor=\"middle\" fill=\"#222\" " +
       "transform=\"rotate(-90 16 " + cy + ")\">" + escape(y_label) + "</text>\n";
  if (!title.empty())
    s += "<text x=\"" + num((left_ + right_) / 2) + "\" y=\"22\" font-size=\"15\" " +
         "text-anchor=\"middle\" fill=\"#222\">" + escape(title) + "</text>\n";
  body_ += s;
}

void SvgPlot::polyline(const std::vector<Point>& points, const std::string& color, double width,
                       const std::string& dash) {
  auto usable = [&](const Point& p) {
    return std::isfinite(p.x) && std::isfinite(p.y) && (!x_.log || p.x > 0) && (!y_.log || p.y > 0);
  };
  std::size_t i = 0;
  while (i < points.size()) {
    while (i < points.size() && !usable(points[i])) ++i;
    std::string pts;
    std::size_t count = 0;
    for (; i < points.size() && usable(points[i]); ++i, ++count) {
      if (count) pts += ' ';
      pts += num(clamp_px(px(points[i].x))) + "," + num(clamp_px(py(points[i].y)));
    }
    if (count < 2) continue;
    body_ += "<polyline points=\"" + pts + "\" fill=\"none\" stroke=\"" + escape(color) +
             "\" stroke-width=\"" + num(width) + "\" stroke-linejoin=\"round\"" +
             (dash.empty() ? "" : " stroke-dasharray=\"" + escape(dash) + "\"") +
             " clip-path=\"url(#plot-area)\"/>\n";
  }
}

void SvgPlot::marker(Point at, const std::string& color, double radius) {
  const Point p = to_pixel(at);
  if (!std::isfinite(p.x) || !std::isfinite(p.y)) return;
  body_ += "<circle cx=\"" + num(clamp_px(p.x)) + "\" cy=\"" + num(clamp_px(p.y)) + "\" r=\"" +
           num(radius) + "\" fill=\"" + escape(color) + "\" clip-path=\"url(#plot-area)\"/>\n";
}

void SvgPlot::text(Point at, const std::string& s, double size, const std::string& anchor,
                   const std::string& color) {
  const Point p = to_pixel(at);
  if (!std::isfinite(p.x) || !std::isfinite(p.y)) return;
  body_ += "<text x=\"" + num(clamp_px(p.x)) + "\" y=\"" + num(clamp_px(p.y)) + "\" font-size=\"" +
           num(size) + "\" text-anchor=\"" + escape(anchor) + "\" fill=\"" + escape(color) + "\">" +
           escape(s) + "</text>\n";
}

void SvgPlot::legend(const std::vector<LegendEntry>& entries) {
  if (entries.empty()) return;
  std::size_t longest = 0;
  for (const auto& e : entries) longest = std::max(longest, e.label.size());
  const double line = 18;
  const double w = 52 + 7.0 * static_cast<double>(longest);
  const double h = 8 + line * static_cast<double>(entries.size());
  const double x0 = right_ + 14;  // beside the plot area, not over it
  const double y0 = top_;
  legend_right_ = x0 + w + 10;
  std::string s = "<g font-size=\"12\">\n<rect class=\"legend\" x=\"" + num(x0) + "\" y=\"" +
                  num(y0) + "\" width=\"" + num(w) + "\" height=\"" + num(h) +
                  "\" fill=\"white\" stroke=\"#bbb\"/>\n";
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const LegendEntry& e = entries[i];
    const double y = y0 + 4 + line * (static_cast<double>(i) + 0.5);
    s += "<line x1=\"" + num(x0 + 8) + "\" y1=\"" + num(y) + "\" x2=\"" + num(x0 + 38) +
         "\" y2=\"" + num(y) + "\" stroke=\"" + escape(e.color) + "\" stroke-width=\"2.5\"" +
         (e.dash.empty() ? "" : " stroke-dasharray=\"" + escape(e.dash) + "\"") + "/>\n";
    if (e.marker)
      s += "<circle cx=\"" + num(x0 + 23) + "\" cy=\"" + num(y) + "\" r=\"3.5\" fill=\"" +
           escape(e.color) + "\"/>\n";
    s += "<text x=\"" + num(x0 + 44) + "\" y=\"" + num(y + 4) + "\" fill=\"#222\">" +
         escape(e.label) + "</text>\n";
  }
  body_ += s + "</g>\n";
}

std::string SvgPlot::str() const {
  const double width = std::max(width_, legend_right_);
  std::string s = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  s += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(width) + "\" height=\"" +
       num(height_) + "\" viewBox=\"0 0 " + num(width) + " " + num(height_) +
       "\" font-family=\"sans-serif\">\n";
  s += "<defs><clipPath id=\"plot-area\"><rect x=\"" + num(left_) + "\" y=\"" + num(top_) +
       "\" width=\"" + num(right_ - left_) + "\" height=\"" + num(bottom_ - top_) +
       "\"/></clipPath></defs>\n";
  s += "<rect width=\"" + num(width) + "\" height=\"" + num(height_) + "\" fill=\"white\"/>\n";
  return s + body_ + "</svg>\n";
}

void SvgPlot::save(const std::string& path) const {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << str();
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace fo::demo
