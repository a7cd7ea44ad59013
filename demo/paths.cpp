// `fusedopt-demo paths`: the classic picture of optimizer trajectories. Eight of the library's
// optimizers (problems() below lists them and their lrs) step a 2-element float32 param
// through fo::Optimizer from the same start on Rosenbrock's valley, Beale's function and the
// saddle x^2 - y^2; damped Newton (fo::newton_minimize, in double) runs beside them, its few
// steps drawn as markers. One SVG per function: log-spaced iso-lines by marching squares, one
// path per optimizer (told apart by colour, dash pattern and marker shape), cut at the frame
// by a clip path, and a legend beside the plot that says where each cut path ends. The SVG is
// written here directly (a handful of element strings) so the command depends on nothing but
// the library.
#include "paths.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "fusedopt/newton.hpp"
#include "fusedopt/optimizer.hpp"
#include "fusedopt/types.hpp"

namespace fo::demo {
namespace {

// ---- the test functions, in double: f, and its gradient g[2] and Hessian h[4] if non-null

double rosenbrock(double x, double y, double* g, double* h) {
  const double a = 1.0 - x, b = y - x * x;
  if (g) {
    g[0] = -2.0 * a - 400.0 * x * b;
    g[1] = 200.0 * b;
  }
  if (h) {
    h[0] = 2.0 - 400.0 * b + 800.0 * x * x;
    h[1] = h[2] = -400.0 * x;
    h[3] = 200.0;
  }
  return a * a + 100.0 * b * b;
}

double beale(double x, double y, double* g, double* h) {
  // f = sum_i t_i^2, t_i = c_i - x + x*y^i (c = 1.5, 2.25, 2.625)
  const double c[3] = {1.5, 2.25, 2.625};
  double f = 0.0, gx = 0.0, gy = 0.0, hxx = 0.0, hxy = 0.0, hyy = 0.0;
  double yi2 = 0.0, yi = 1.0;  // y^(i-2) (0 for i = 1: its term vanishes), y^(i-1)
  for (int i = 1; i <= 3; ++i) {
    const double yp = yi * y;  // y^i
    const double t = c[i - 1] - x + x * yp;
    const double tx = yp - 1.0;    // dt/dx
    const double ty = i * x * yi;  // dt/dy
    const double txy = i * yi;     // d2t/dxdy
    const double tyy = i * (i - 1) * x * yi2;
    f += t * t;
    gx += 2.0 * t * tx;
    gy += 2.0 * t * ty;
    hxx += 2.0 * tx * tx;
    hxy += 2.0 * (tx * ty + t * txy);
    hyy += 2.0 * (ty * ty + t * tyy);
    yi2 = yi;
    yi = yp;
  }
  if (g) {
    g[0] = gx;
    g[1] = gy;
  }
  if (h) {
    h[0] = hxx;
    h[1] = h[2] = hxy;
    h[3] = hyy;
  }
  return f;
}

double saddle(double x, double y, double* g, double* h) {
  if (g) {
    g[0] = 2.0 * x;
    g[1] = -2.0 * y;
  }
  if (h) {
    h[0] = 2.0;
    h[1] = h[2] = 0.0;
    h[3] = -2.0;
  }
  return x * x - y * y;
}

struct OptSpec {
  const char* algorithm;
  std::vector<std::pair<const char*, double>> options;  // lr first
};

struct Problem {
  const char* name;   // file suffix
  const char* title;  // the formula; the start and step count are added
  double (*f)(double, double, double*, double*);
  double x0, y0;
  double xmin, xmax, ymin, ymax;  // the plotted window
  bool has_min;
  double mx, my;  // the known minimum
  int steps;
  bool signed_levels;  // f takes both signs: levels +-10^k and 0
  double level_lo;     // log10 of the lowest |level|
  std::vector<OptSpec> optimizers;
};

// Learning rates chosen per function so each optimizer's path is characteristic and stays
// mostly in the window (one lr for all would leave half of them still at the start or gone).
// Fields in declaration order: name, title, f, start, window (x range, y range), known
// minimum, steps, signed levels, log10 of the lowest level, optimizers.
// clang-format off
std::vector<Problem> problems() {
  std::vector<Problem> p;
  p.push_back({"rosenbrock", "Rosenbrock (1-x)^2 + 100(y-x^2)^2", rosenbrock,
               -1.5, 2.0,  -2.0, 2.0, -1.0, 3.0,  true, 1.0, 1.0,  500, false, -1.0,
               {{"sgd", {{"lr", 1e-3}, {"momentum", 0.9}}},
                {"rmsprop", {{"lr", 1e-2}}},
                {"adagrad", {{"lr", 0.3}}},
                {"adam", {{"lr", 0.1}}},
                {"adamw", {{"lr", 0.1}, {"weight_decay", 0.1}}},
                {"lion", {{"lr", 1e-2}}},
                {"rprop", {{"lr", 1e-3}}},
                {"adadelta", {{"lr", 3.0}}}}});
  p.push_back({"beale", "Beale (1.5-x+xy)^2 + (2.25-x+xy^2)^2 + (2.625-x+xy^3)^2", beale,
               1.0, 1.5,  -0.5, 4.5, -1.5, 2.0,  true, 3.0, 0.5,  500, false, -1.5,
               {{"sgd", {{"lr", 1e-3}, {"momentum", 0.9}}},
                {"rmsprop", {{"lr", 3e-2}}},
                {"adagrad", {{"lr", 1.0}}},
                {"adam", {{"lr", 0.1}}},
                {"adamw", {{"lr", 0.1}, {"weight_decay", 0.1}}},
                {"lion", {{"lr", 0.1}}},
                {"rprop", {{"lr", 1e-3}}},
                {"adadelta", {{"lr", 3.0}}}}});
  // The saddle: start just off the ridge y = 0; every method must escape along y.
  p.push_back({"saddle", "Saddle x^2 - y^2", saddle,
               1.5, 1e-3,  -2.0, 2.0, -2.0, 2.0,  false, 0.0, 0.0,  300, true, -1.5,
               {{"sgd", {{"lr", 1e-2}, {"momentum", 0.9}}},
                {"rmsprop", {{"lr", 1e-2}}},
                {"adagrad", {{"lr", 0.1}}},
                {"adam", {{"lr", 0.03}}},
                {"adamw", {{"lr", 0.03}, {"weight_decay", 0.1}}},
                {"lion", {{"lr", 1e-2}}},
                {"rprop", {{"lr", 1e-3}}},
                {"adadelta", {{"lr", 10.0}}}}});
  return p;
}
// clang-format on

struct Trace {
  std::string label;
  std::vector<std::pair<double, double>> pts;  // the start, then after each step
  int steps = 0;
  bool left = false;  // left the window (enlarged by a quarter each side): stopped there
  bool markers = false;
};

bool outside(const Problem& pr, double x, double y) {
  const double mx = 0.25 * (pr.xmax - pr.xmin), my = 0.25 * (pr.ymax - pr.ymin);
  return !(x >= pr.xmin - mx && x <= pr.xmax + mx && y >= pr.ymin - my && y <= pr.ymax + my);
}

std::string fmt_num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Three significant digits: where a path ends.
std::string short_num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

Trace run_optimizer(const Problem& pr, const OptSpec& spec) {
  Trace t;
  t.label = spec.algorithm;
  for (std::size_t i = 0; i < spec.options.size(); ++i)
    t.label += (i ? ", " : " (") + std::string(spec.options[i].first) + " " +
               fmt_num(spec.options[i].second) + (i + 1 == spec.options.size() ? ")" : "");
  Optimizer opt(spec.algorithm);
  for (const auto& [key, value] : spec.options) opt.set_option(key, value);
  alignas(16) float p[2] = {static_cast<float>(pr.x0), static_cast<float>(pr.y0)};
  alignas(16) float g[2];
  opt.add_param("p", p, DType::f32, {2});
  t.pts.emplace_back(p[0], p[1]);
  for (int s = 0; s < pr.steps; ++s) {
    double gd[2];
    pr.f(p[0], p[1], gd, nullptr);
    g[0] = static_cast<float>(gd[0]);
    g[1] = static_cast<float>(gd[1]);
    opt.step({g});
    t.pts.emplace_back(p[0], p[1]);
    ++t.steps;
    if (!std::isfinite(p[0]) || !std::isfinite(p[1]) || outside(pr, p[0], p[1])) {
      t.left = true;
      if (!std::isfinite(p[0]) || !std::isfinite(p[1])) t.pts.pop_back();
      break;
    }
  }
  return t;
}

Trace run_newton(const Problem& pr) {
  Trace t;
  t.label = "newton (damped, double)";
  t.markers = true;
  std::vector<double> x = {pr.x0, pr.y0};
  NewtonOptions o;
  o.max_iters = 100;
  const NewtonResult r = newton_minimize(
      [&pr](const double* v, double* g, double* h) { return pr.f(v[0], v[1], g, h); }, x, o);
  t.pts.emplace_back(pr.x0, pr.y0);
  for (const std::vector<double>& v : r.trajectory) {
    t.pts.emplace_back(v[0], v[1]);
    ++t.steps;
    if (outside(pr, v[0], v[1])) {  // on the saddle it escapes without end
      t.left = true;
      break;
    }
  }
  return t;
}

// ---- marching squares over a grid of f

struct Grid {
  int nx, ny;
  std::vector<double> v;  // v[j * nx + i] at (xmin + i*dx, ymin + j*dy)
  double at(int i, int j) const { return v[static_cast<std::size_t>(j) * nx + i]; }
};

Grid sample(const Problem& pr, int nx, int ny) {
  Grid g{nx, ny, std::vector<double>(static_cast<std::size_t>(nx) * ny)};
  for (int j = 0; j < ny; ++j)
    for (int i = 0; i < nx; ++i)
      g.v[static_cast<std::size_t>(j) * nx + i] =
          pr.f(pr.xmin + (pr.xmax - pr.xmin) * i / (nx - 1),
               pr.ymin + (pr.ymax - pr.ymin) * j / (ny - 1), nullptr, nullptr);
  return g;
}

// Segments of the iso-line f = level, in grid coordinates (i, j as doubles). Corners of a
// cell: 0 (i,j), 1 (i+1,j), 2 (i+1,j+1), 3 (i,j+1); edge e joins corner e and e+1 (mod 4).
// The two saddle cases (diagonal corners above) are split by the cell's centre value.
using Seg = std::pair<std::pair<double, double>, std::pair<double, double>>;
std::vector<Seg> iso_line(const Grid& g, double level) {
  static const int kCornerI[4] = {0, 1, 1, 0}, kCornerJ[4] = {0, 0, 1, 1};
  // Edge pairs per case (bit k: corner k above the level); -1 ends the list.
  static const int kTable[16][4] = {
      {-1, -1, -1, -1}, {3, 0, -1, -1}, {0, 1, -1, -1}, {3, 1, -1, -1},
      {1, 2, -1, -1},   {3, 0, 1, 2},   {0, 2, -1, -1}, {3, 2, -1, -1},
      {2, 3, -1, -1},   {0, 2, -1, -1}, {0, 1, 2, 3},   {1, 2, -1, -1},
      {1, 3, -1, -1},   {0, 1, -1, -1}, {3, 0, -1, -1}, {-1, -1, -1, -1}};
  std::vector<Seg> segs;
  for (int j = 0; j + 1 < g.ny; ++j)
    for (int i = 0; i + 1 < g.nx; ++i) {
      double c[4];
      int code = 0;
      bool finite = true;
      for (int k = 0; k < 4; ++k) {
        c[k] = g.at(i + kCornerI[k], j + kCornerJ[k]);
        finite = finite && std::isfinite(c[k]);
        if (c[k] > level) code |= 1 << k;
      }
      if (!finite || code == 0 || code == 15) continue;
      int edges[4];
      std::copy(kTable[code], kTable[code] + 4, edges);
      const bool centre_above = 0.25 * (c[0] + c[1] + c[2] + c[3]) > level;
      if (code == 5 && centre_above) {  // 0 and 2 joined through the centre: cut off 1 and 3
        const int e[4] = {0, 1, 2, 3};
        std::copy(e, e + 4, edges);
      } else if (code == 10 && centre_above) {  // 1 and 3 joined: cut off 0 and 2
        const int e[4] = {3, 0, 1, 2};
        std::copy(e, e + 4, edges);
      }
      auto point = [&](int e) {
        const int a = e, b = (e + 1) % 4;
        const double t = (level - c[a]) / (c[b] - c[a]);
        return std::make_pair(i + kCornerI[a] + t * (kCornerI[b] - kCornerI[a]),
                              j + kCornerJ[a] + t * (kCornerJ[b] - kCornerJ[a]));
      };
      for (int k = 0; k < 4 && edges[k] >= 0; k += 2)
        segs.emplace_back(point(edges[k]), point(edges[k + 1]));
    }
  return segs;
}

std::vector<double> levels(const Problem& pr, const Grid& g) {
  double hi = 0.0;
  for (double v : g.v)
    if (std::isfinite(v)) hi = std::max(hi, std::fabs(v));
  const double top = std::log10(std::max(hi, 1e-300));
  const int count = pr.signed_levels ? 9 : 18;
  std::vector<double> out;
  for (int k = 0; k < count; ++k) {
    const double v = std::pow(10.0, pr.level_lo + (top - pr.level_lo) * (k + 0.5) / count);
    out.push_back(v);
    if (pr.signed_levels) out.push_back(-v);
  }
  if (pr.signed_levels) out.push_back(0.0);
  return out;
}

// ---- SVG, as strings

constexpr double kWidth = 1040, kHeight = 720;
constexpr double kPlotX = 70, kPlotY = 50, kPlotW = 600, kPlotH = 600;
const char* const kColours[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                "#8c564b", "#e377c2", "#17becf", "#bcbd22"};
// Beside its colour, each optimizer's path has its own dash pattern and marker shape (a
// marker every tenth of the steps): paths that run together, as in Rosenbrock's valley, stay
// told apart, and the markers show how far each got in the same number of steps.
const char* const kDashes[] = {"", "7 3", "2 2", "9 3 2 3", "4 4", "12 3 3 3", "1 3", "6 2 2 2"};
// Marker outlines, radius about 1, y down: square, triangles up and down, diamond, plus,
// triangles right and left, hexagon.
const std::vector<std::vector<std::pair<double, double>>> kShapes = {
    {{-0.8, -0.8}, {0.8, -0.8}, {0.8, 0.8}, {-0.8, 0.8}},
    {{0, -1.1}, {0.95, 0.7}, {-0.95, 0.7}},
    {{0, 1.1}, {0.95, -0.7}, {-0.95, -0.7}},
    {{0, -1.2}, {1, 0}, {0, 1.2}, {-1, 0}},
    {{-0.35, -1},
     {0.35, -1},
     {0.35, -0.35},
     {1, -0.35},
     {1, 0.35},
     {0.35, 0.35},
     {0.35, 1},
     {-0.35, 1},
     {-0.35, 0.35},
     {-1, 0.35},
     {-1, -0.35},
     {-0.35, -0.35}},
    {{1.1, 0}, {-0.7, -0.95}, {-0.7, 0.95}},
    {{-1.1, 0}, {0.7, -0.95}, {0.7, 0.95}},
    {{1, 0}, {0.5, 0.87}, {-0.5, 0.87}, {-1, 0}, {-0.5, -0.87}, {0.5, -0.87}}};

std::string esc(const std::string& s) {
  std::string o;
  for (char ch : s) {
    switch (ch) {
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '&': o += "&amp;"; break;
      case '"': o += "&quot;"; break;
      default: o += ch;
    }
  }
  return o;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

// Path data for marker shape `k` of radius `r` pixels centred on (x, y).
std::string marker_d(std::size_t k, double x, double y, double r) {
  std::string d;
  for (const auto& [u, v] : kShapes[k % kShapes.size()])
    d += (d.empty() ? "M" : "L") + num(x + r * u) + " " + num(y + r * v);
  return d + "Z";
}

// Whether a trace runs outside the plotted window anywhere: it is drawn cut at the frame.
bool clipped(const Problem& pr, const Trace& t) {
  for (const auto& [x, y] : t.pts)
    if (x < pr.xmin || x > pr.xmax || y < pr.ymin || y > pr.ymax) return true;
  return false;
}

struct Svg {
  std::string out;
  void text(double x, double y, const std::string& s, const char* extra = "") {
    out += "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" " + extra + ">" + esc(s) + "</text>\n";
  }
  void line(double x1, double y1, double x2, double y2, const char* style) {
    out += "<line x1=\"" + num(x1) + "\" y1=\"" + num(y1) + "\" x2=\"" + num(x2) + "\" y2=\"" +
           num(y2) + "\" " + style + "/>\n";
  }
};

double nice_step(double range) {
  const double raw = range / 6.0, p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (m * p >= raw) return m * p;
  return 10.0 * p;
}

std::string render(const Problem& pr, const std::vector<Trace>& traces) {
  auto px = [&](double x) { return kPlotX + (x - pr.xmin) / (pr.xmax - pr.xmin) * kPlotW; };
  auto py = [&](double y) { return kPlotY + (pr.ymax - y) / (pr.ymax - pr.ymin) * kPlotH; };
  Svg s;
  s.out += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  s.out += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(kWidth) + "\" height=\"" +
           num(kHeight) + "\" viewBox=\"0 0 " + num(kWidth) + " " + num(kHeight) +
           "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  s.out += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  s.out += "<defs><clipPath id=\"plot\"><rect x=\"" + num(kPlotX) + "\" y=\"" + num(kPlotY) +
           "\" width=\"" + num(kPlotW) + "\" height=\"" + num(kPlotH) + "\"/></clipPath></defs>\n";
  s.text(kPlotX, 30,
         std::string(pr.title) + ", start (" + fmt_num(pr.x0) + ", " + fmt_num(pr.y0) + "), " +
             std::to_string(pr.steps) + " steps",
         "font-size=\"15\"");

  // Iso-lines: one path per level, darker for lower |f|; the zero level of the saddle solid.
  const int nx = 241, ny = 241;
  const Grid grid = sample(pr, nx, ny);
  const double gx = kPlotW / (nx - 1), gy = kPlotH / (ny - 1);
  s.out += "<g clip-path=\"url(#plot)\" fill=\"none\" stroke-width=\"0.7\">\n";
  for (double level : levels(pr, grid)) {
    const std::vector<Seg> segs = iso_line(grid, level);
    if (segs.empty()) continue;
    const double shade =
        level == 0.0
            ? 0.0
            : std::min(1.0, std::max(0.0, (std::log10(std::fabs(level)) - pr.level_lo) / 5.0));
    const int grey = 90 + static_cast<int>(130.0 * shade);
    char colour[32];
    std::snprintf(colour, sizeof colour, level < 0.0 ? "rgb(%d,%d,255)" : "rgb(%d,%d,%d)", grey,
                  grey, grey);
    s.out += "<path stroke=\"" + std::string(colour) + "\" d=\"";
    for (const Seg& sg : segs)
      s.out += "M" + num(kPlotX + sg.first.first * gx) + " " +
               num(kPlotY + kPlotH - sg.first.second * gy) + "L" +
               num(kPlotX + sg.second.first * gx) + " " +
               num(kPlotY + kPlotH - sg.second.second * gy);
    s.out += "\"/>\n";
  }
  s.out += "</g>\n";

  // Axes: frame, ticks, labels.
  s.out += "<rect x=\"" + num(kPlotX) + "\" y=\"" + num(kPlotY) + "\" width=\"" + num(kPlotW) +
           "\" height=\"" + num(kPlotH) + "\" fill=\"none\" stroke=\"black\"/>\n";
  const double sx = nice_step(pr.xmax - pr.xmin), sy = nice_step(pr.ymax - pr.ymin);
  for (double x = std::ceil(pr.xmin / sx) * sx; x <= pr.xmax + 1e-9; x += sx) {
    s.line(px(x), kPlotY + kPlotH, px(x), kPlotY + kPlotH + 5, "stroke=\"black\"");
    s.text(px(x), kPlotY + kPlotH + 18, fmt_num(std::fabs(x) < 1e-9 ? 0.0 : x),
           "text-anchor=\"middle\"");
  }
  for (double y = std::ceil(pr.ymin / sy) * sy; y <= pr.ymax + 1e-9; y += sy) {
    s.line(kPlotX - 5, py(y), kPlotX, py(y), "stroke=\"black\"");
    s.text(kPlotX - 8, py(y) + 4, fmt_num(std::fabs(y) < 1e-9 ? 0.0 : y), "text-anchor=\"end\"");
  }
  s.text(kPlotX + kPlotW / 2, kPlotY + kPlotH + 38, "x", "text-anchor=\"middle\"");
  s.text(kPlotX - 45, kPlotY + kPlotH / 2, "y", "text-anchor=\"middle\"");

  // Paths, the start, the minimum; all cut at the frame (the clip path).
  s.out +=
      "<g clip-path=\"url(#plot)\" fill=\"none\" stroke-width=\"1.4\" "
      "stroke-opacity=\"0.85\" stroke-linejoin=\"round\">\n";
  // Newton (markers) first, underneath: its few long steps would hide the others' paths.
  const std::size_t every = static_cast<std::size_t>(std::max(1, pr.steps / 10));
  auto draw = [&](std::size_t k) {
    const Trace& t = traces[k];
    const std::string colour = t.markers ? "black" : kColours[k % 9];
    s.out += "<polyline stroke=\"" + colour + "\"";
    if (!t.markers && kDashes[k % 8][0] != '\0')
      s.out += " stroke-dasharray=\"" + std::string(kDashes[k % 8]) + "\"";
    s.out += " points=\"";
    for (const auto& [x, y] : t.pts) s.out += num(px(x)) + "," + num(py(y)) + " ";
    s.out += "\"/>\n";
    if (t.markers) {
      for (std::size_t i = 1; i < t.pts.size(); ++i)
        s.out += "<circle cx=\"" + num(px(t.pts[i].first)) + "\" cy=\"" + num(py(t.pts[i].second)) +
                 "\" r=\"3.5\" fill=\"white\" stroke=\"black\"/>\n";
      return;
    }
    std::string d;
    for (std::size_t i = every; i < t.pts.size(); i += every)
      d += marker_d(k, px(t.pts[i].first), py(t.pts[i].second), 4.0);
    if (!d.empty())
      s.out += "<path fill=\"" + colour +
               "\" fill-opacity=\"1\" stroke=\"white\" stroke-width=\"0.6\" d=\"" + d + "\"/>\n";
  };
  for (std::size_t k = 0; k < traces.size(); ++k)
    if (traces[k].markers) draw(k);
  for (std::size_t k = 0; k < traces.size(); ++k)
    if (!traces[k].markers) draw(k);
  s.out += "<circle cx=\"" + num(px(pr.x0)) + "\" cy=\"" + num(py(pr.y0)) +
           "\" r=\"5\" fill=\"black\"/>\n";
  if (pr.has_min)
    s.out += "<path d=\"M" + num(px(pr.mx) - 7) + " " + num(py(pr.my) - 7) +
             "l14 14m0 -14l-14 14\" "
             "stroke=\"black\" stroke-width=\"2.5\"/>\n";
  s.out += "</g>\n";

  // Legend: each path's colour, dash and marker; [clipped] where it runs outside the frame.
  const double lx = kPlotX + kPlotW + 20, ly = kPlotY;
  const double lh = 22.0 * static_cast<double>(traces.size() + 2) + 10;
  s.out += "<rect class=\"legend\" x=\"" + num(lx) + "\" y=\"" + num(ly) + "\" width=\"" +
           num(kWidth - lx - 10) + "\" height=\"" + num(lh) +
           "\" fill=\"white\" stroke=\"#888\"/>\n";
  std::vector<std::size_t> cut;
  for (std::size_t k = 0; k < traces.size(); ++k) {
    const Trace& t = traces[k];
    const double y = ly + 20 + 22.0 * static_cast<double>(k);
    const std::string colour = t.markers ? "black" : kColours[k % 9];
    const std::string dash = t.markers || kDashes[k % 8][0] == '\0'
                                 ? ""
                                 : " stroke-dasharray=\"" + std::string(kDashes[k % 8]) + "\"";
    s.line(lx + 10, y - 4, lx + 40, y - 4,
           ("stroke=\"" + colour + "\" stroke-width=\"2.5\"" + dash).c_str());
    if (t.markers)
      s.out += "<circle cx=\"" + num(lx + 25) + "\" cy=\"" + num(y - 4) +
               "\" r=\"3.5\" fill=\"white\" stroke=\"black\"/>\n";
    else
      s.out += "<path fill=\"" + colour + "\" stroke=\"white\" stroke-width=\"0.6\" d=\"" +
               marker_d(k, lx + 25, y - 4, 4.0) + "\"/>\n";
    const bool is_cut = clipped(pr, t);
    if (is_cut) cut.push_back(k);
    s.text(lx + 48, y, t.label + (is_cut ? " [clipped]" : ""));
  }
  const double ye = ly + 20 + 22.0 * static_cast<double>(traces.size());
  s.out +=
      "<circle cx=\"" + num(lx + 25) + "\" cy=\"" + num(ye - 4) + "\" r=\"5\" fill=\"black\"/>\n";
  s.text(lx + 48, ye, "start (" + fmt_num(pr.x0) + ", " + fmt_num(pr.y0) + ")");
  if (pr.has_min) {
    s.out += "<path d=\"M" + num(lx + 19) + " " + num(ye + 12) +
             "l12 12m0 -12l-12 12\" "
             "stroke=\"black\" stroke-width=\"2.5\"/>\n";
    s.text(lx + 48, ye + 22, "minimum (" + fmt_num(pr.mx) + ", " + fmt_num(pr.my) + ")");
  }
  double note_y = ly + lh + 20;
  s.text(lx, note_y,
         "iso-lines at log-spaced levels of " +
             std::string(pr.signed_levels ? "|f| (blue: f < 0)" : "f"));
  s.text(lx, note_y + 16, "markers every " + std::to_string(every) + " steps (newton: every step)");
  // Where the clipped paths end, which the picture cannot show.
  if (!cut.empty()) {
    note_y += 44;
    s.text(lx, note_y, "[clipped]: the path runs outside the frame and is cut");
    s.text(lx, note_y + 16, "there. Where each ends, (x, y) after n steps:");
    note_y += 16;
    bool any_left = false;
    for (std::size_t k : cut) {
      const Trace& t = traces[k];
      note_y += 17;
      any_left = any_left || t.left;
      s.text(lx + 10, note_y,
             t.label.substr(0, t.label.find(' ')) + ": (" + short_num(t.pts.back().first) + ", " +
                 short_num(t.pts.back().second) + ") after " + std::to_string(t.steps) +
                 (t.left ? " *" : ""));
    }
    if (any_left) {
      s.text(lx, note_y + 22, "* stopped on leaving the window: the frame and a");
      s.text(lx, note_y + 38, "quarter of its width or height beyond each side");
    }
  }
  s.out += "</svg>\n";
  return s.out;
}

int usage(std::FILE* to) {
  std::fprintf(to,
               "usage: fusedopt-demo paths [--out DIR]\n"
               "  Draws each optimizer's trajectory on Rosenbrock, Beale and a saddle into\n"
               "  DIR/paths_<function>.svg (default DIR: ./fusedopt-demo-out).\n");
  return to == stdout ? 0 : 2;
}

}  // namespace

int run_paths(int argc, char** argv) {
  std::string dir = "fusedopt-demo-out";
  for (int i = 1; i < argc; ++i) {  // argv[0] is "paths"
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") return usage(stdout);
    if (a == "--out" && i + 1 < argc) {
      dir = argv[++i];
    } else if (a.rfind("--out=", 0) == 0 && a.size() > 6) {
      dir = a.substr(6);
    } else {
      std::fprintf(stderr, "fusedopt-demo paths: unexpected argument '%s'\n", a.c_str());
      return usage(stderr);
    }
  }

  try {
    prepare_out_dir(dir);
    std::vector<std::string> written;
    std::printf("%-10s %-40s %6s %-20s %12s %12s\n", "function", "optimizer", "steps",
                "final (x, y)", "final f", "dist to min");
    for (const Problem& pr : problems()) {
      std::vector<Trace> traces;
      for (const OptSpec& spec : pr.optimizers) traces.push_back(run_optimizer(pr, spec));
      traces.push_back(run_newton(pr));
      for (const Trace& t : traces) {
        const auto [x, y] = t.pts.back();
        const double f = pr.f(x, y, nullptr, nullptr);
        const std::string dist = pr.has_min ? fmt_num(std::hypot(x - pr.mx, y - pr.my)) : "-";
        const std::string at = "(" + short_num(x) + ", " + short_num(y) + ")";
        std::printf("%-10s %-40s %6d %-20s %12.6g %12s%s\n", pr.name, t.label.c_str(), t.steps,
                    at.c_str(), f, dist.c_str(),
                    t.left           ? "  left the window: stopped"
                    : clipped(pr, t) ? "  outside the plot: clipped"
                                     : "");
      }
      const std::string path =
          (std::filesystem::path(dir) / ("paths_" + std::string(pr.name) + ".svg")).string();
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      const std::string svg = render(pr, traces);
      out.write(svg.data(), static_cast<std::streamsize>(svg.size()));
      out.close();
      if (!out) throw Error(StatusCode::io_error, "writing " + path + " failed");
      written.push_back(path);
    }
    std::printf(
        "(a path that leaves the window, the plotted range and a quarter beyond each side, stops\n"
        "there: on the saddle, steps = steps to escape. The SVGs cut paths at the plot's frame\n"
        "and list where each clipped path ends.)\n");
    for (const std::string& p : written) std::printf("wrote %s\n", p.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fusedopt-demo paths: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace fo::demo
