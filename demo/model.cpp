// Forward and backward passes of the demo's models. Weights are stored [in, out], so every
// inner loop runs along `out` over contiguous memory (an axpy the compiler vectorises without
// reassociating sums), and zero pixels (about half of them) are skipped outright.
#include "model.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "data.hpp"

namespace fo::demo {

const char* model_name(ModelKind kind) { return kind == ModelKind::softmax ? "softmax" : "mlp"; }

namespace {

constexpr std::size_t kAlign = 16;  // elements: every tensor starts 64-byte aligned (float)

std::size_t round_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// -log(softmax(z)[y]) through the log-sum-exp with the max subtracted; the probabilities into
// `prob` when it is not null.
template <class T>
T cross_entropy(const T* z, int y, T* prob) {
  const T m = *std::max_element(z, z + kClasses);
  T s = 0;
  for (int c = 0; c < kClasses; ++c) s += std::exp(z[c] - m);
  if (prob)
    for (int c = 0; c < kClasses; ++c) prob[c] = std::exp(z[c] - m) / s;
  return m + std::log(s) - z[y];
}

}  // namespace

template <class T>
Model<T>::Model(ModelSpec spec) : spec_(spec) {
  if (spec_.kind == ModelKind::mlp && spec_.hidden <= 0)
    throw std::invalid_argument("the mlp needs a positive hidden width");
  auto add = [&](std::string name, std::vector<std::int64_t> shape) {
    TensorSlice s;
    s.name = std::move(name);
    s.numel = 1;
    for (auto d : shape) s.numel *= static_cast<std::size_t>(d);
    s.shape = std::move(shape);
    s.offset = size_;
    size_ = round_up(size_ + s.numel);
    tensors_.push_back(std::move(s));
  };
  if (spec_.kind == ModelKind::softmax) {
    add("W", {kFeatures, kClasses});
    add("b", {kClasses});
  } else {
    const std::int64_t h = spec_.hidden;
    add("W1", {kFeatures, h});
    add("b1", {h});
    add("W2", {h, kClasses});
    add("b2", {kClasses});
  }
}

template <class T>
void Model<T>::init(T* params, std::uint64_t seed) const {
  std::fill(params, params + size_, T(0));
  Rng rng(seed);
  for (const TensorSlice& t : tensors_) {
    if (t.shape.size() != 2) continue;  // biases stay zero
    const double fan_in = static_cast<double>(t.shape[0]);
    const double fan_out = static_cast<double>(t.shape[1]);
    const bool he =
        spec_.kind == ModelKind::mlp && spec_.activation == Activation::relu && t.name == "W1";
    const double a = he ? std::sqrt(6.0 / fan_in) : std::sqrt(6.0 / (fan_in + fan_out));
    for (std::size_t i = 0; i < t.numel; ++i)
      params[t.offset + i] = static_cast<T>((2.0 * rng.uniform() - 1.0) * a);
  }
}

template <class T>
void Model<T>::forward(const T* params, const float* x, std::size_t n) const {
  logits_.resize(n * kClasses);
  if (spec_.kind == ModelKind::softmax) {
    const T* w = params + tensors_[0].offset;
    const T* b = params + tensors_[1].offset;
    for (std::size_t i = 0; i < n; ++i) {
      T* z = logits_.data() + i * kClasses;
      std::copy(b, b + kClasses, z);
      const float* xi = x + i * kFeatures;
      for (int k = 0; k < kFeatures; ++k) {
        if (xi[k] == 0.0f) continue;
        const T xk = static_cast<T>(xi[k]);
        const T* wk = w + k * kClasses;
        for (int c = 0; c < kClasses; ++c) z[c] += xk * wk[c];
      }
    }
    return;
  }
  const std::size_t hd = static_cast<std::size_t>(spec_.hidden);
  const T* w1 = params + tensors_[0].offset;
  const T* b1 = params + tensors_[1].offset;
  const T* w2 = params + tensors_[2].offset;
  const T* b2 = params + tensors_[3].offset;
  hidden_.resize(n * hd);
  for (std::size_t i = 0; i < n; ++i) {
    T* h = hidden_.data() + i * hd;
    std::copy(b1, b1 + hd, h);
    const float* xi = x + i * kFeatures;
    for (int k = 0; k < kFeatures; ++k) {
      if (xi[k] == 0.0f) continue;
      const T xk = static_cast<T>(xi[k]);
      const T* wk = w1 + static_cast<std::size_t>(k) * hd;
      for (std::size_t j = 0; j < hd; ++j) h[j] += xk * wk[j];
    }
    if (spec_.activation == Activation::tanh)
      for (std::size_t j = 0; j < hd; ++j) h[j] = std::tanh(h[j]);
    else
      for (std::size_t j = 0; j < hd; ++j) h[j] = std::max(h[j], T(0));
    T* z = logits_.data() + i * kClasses;
    std::copy(b2, b2 + kClasses, z);
    for (std::size_t j = 0; j < hd; ++j) {
      const T hj = h[j];
      const T* wj = w2 + j * kClasses;
      for (int c = 0; c < kClasses; ++c) z[c] += hj * wj[c];
    }
  }
}

template <class T>
T Model<T>::loss(const T* params, const float* x, const int* y, std::size_t n, T* grad) const {
  if (n == 0) throw std::invalid_argument("loss of an empty batch");
  forward(params, x, n);
  // delta = d(mean loss)/d(z) = (softmax(z) - onehot(y)) / n.
  double total = 0;
  if (grad) delta_.resize(n * kClasses);
  const T inv_n = T(1) / static_cast<T>(n);
  for (std::size_t i = 0; i < n; ++i) {
    T* d = grad ? delta_.data() + i * kClasses : nullptr;
    total += static_cast<double>(cross_entropy(logits_.data() + i * kClasses, y[i], d));
    if (!d) continue;
    d[y[i]] -= T(1);
    for (int c = 0; c < kClasses; ++c) d[c] *= inv_n;
  }
  if (!grad) return static_cast<T>(total / static_cast<double>(n));

  std::fill(grad, grad + size_, T(0));
  if (spec_.kind == ModelKind::softmax) {
    T* dw = grad + tensors_[0].offset;
    T* db = grad + tensors_[1].offset;
    for (std::size_t i = 0; i < n; ++i) {
      const T* d = delta_.data() + i * kClasses;
      for (int c = 0; c < kClasses; ++c) db[c] += d[c];
      const float* xi = x + i * kFeatures;
      for (int k = 0; k < kFeatures; ++k) {
        if (xi[k] == 0.0f) continue;
        const T xk = static_cast<T>(xi[k]);
        T* dwk = dw + k * kClasses;
        for (int c = 0; c < kClasses; ++c) dwk[c] += xk * d[c];
      }
    }
    return static_cast<T>(total / static_cast<double>(n));
  }

  const std::size_t hd = static_cast<std::size_t>(spec_.hidden);
  const T* w2 = params + tensors_[2].offset;
  T* dw1 = grad + tensors_[0].offset;
  T* db1 = grad + tensors_[1].offset;
  T* dw2 = grad + tensors_[2].offset;
  T* db2 = grad + tensors_[3].offset;
  std::vector<T> dh(hd);
  for (std::size_t i = 0; i < n; ++i) {
    const T* d = delta_.data() + i * kClasses;
    const T* h = hidden_.data() + i * hd;
    for (int c = 0; c < kClasses; ++c) db2[c] += d[c];
    for (std::size_t j = 0; j < hd; ++j) {
      const T* wj = w2 + j * kClasses;
      T* dwj = dw2 + j * kClasses;
      T back = 0;
      for (int c = 0; c < kClasses; ++c) {
        dwj[c] += h[j] * d[c];
        back += wj[c] * d[c];
      }
      // Through the activation, from its output: tanh' = 1 - tanh^2; relu' = [h > 0].
      dh[j] = spec_.activation == Activation::tanh ? back * (T(1) - h[j] * h[j])
                                                   : (h[j] > T(0) ? back : T(0));
    }
    for (std::size_t j = 0; j < hd; ++j) db1[j] += dh[j];
    const float* xi = x + i * kFeatures;
    for (int k = 0; k < kFeatures; ++k) {
      if (xi[k] == 0.0f) continue;
      const T xk = static_cast<T>(xi[k]);
      T* dwk = dw1 + static_cast<std::size_t>(k) * hd;
      for (std::size_t j = 0; j < hd; ++j) dwk[j] += xk * dh[j];
    }
  }
  return static_cast<T>(total / static_cast<double>(n));
}

template <class T>
Evaluation Model<T>::evaluate(const T* params, const float* x, const int* y, std::size_t n) const {
  Evaluation e;
  if (n == 0) return e;
  forward(params, x, n);
  std::size_t correct = 0;
  double total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const T* z = logits_.data() + i * kClasses;
    total += static_cast<double>(cross_entropy(z, y[i], static_cast<T*>(nullptr)));
    correct += static_cast<std::size_t>(std::max_element(z, z + kClasses) - z == y[i]);
  }
  e.loss = total / static_cast<double>(n);
  e.accuracy = static_cast<double>(correct) / static_cast<double>(n);
  return e;
}

double softmax_objective(const double* theta, const float* x, const int* y, std::size_t n,
                         int features, int classes, double l2, double* grad, double* hess) {
  if (n == 0) throw std::invalid_argument("softmax_objective: no examples");
  if (features < 1 || classes < 2)
    throw std::invalid_argument("softmax_objective: needs features >= 1 and classes >= 2");
  if (!(l2 >= 0)) throw std::invalid_argument("softmax_objective: l2 must be >= 0");
  const std::size_t nf = static_cast<std::size_t>(features);
  const std::size_t nc = static_cast<std::size_t>(classes);
  const std::size_t rows = nf + 1;   // the features and the bias's constant 1
  const std::size_t np = rows * nc;  // unknowns
  const double* bias = theta + nf * nc;
  const double inv_n = 1.0 / static_cast<double>(n);

  // The probabilities of every example, and the loss (the log-sum-exp with the max taken out).
  std::vector<double> prob(n * nc), z(nc);
  double total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (y[i] < 0 || y[i] >= classes)
      throw std::invalid_argument("softmax_objective: label out of range");
    std::copy(bias, bias + nc, z.begin());
    const float* xi = x + i * nf;
    for (std::size_t k = 0; k < nf; ++k) {
      if (xi[k] == 0.0f) continue;
      const double xk = xi[k];
      const double* wk = theta + k * nc;
      for (std::size_t c = 0; c < nc; ++c) z[c] += xk * wk[c];
    }
    const double m = *std::max_element(z.begin(), z.end());
    double s = 0;
    for (std::size_t c = 0; c < nc; ++c) s += std::exp(z[c] - m);
    double* p = prob.data() + i * nc;
    for (std::size_t c = 0; c < nc; ++c) p[c] = std::exp(z[c] - m) / s;
    total += m + std::log(s) - z[static_cast<std::size_t>(y[i])];
  }
  double sq = 0;
  for (std::size_t j = 0; j < np; ++j) sq += theta[j] * theta[j];
  const double objective = total * inv_n + 0.5 * l2 * sq;

  if (grad) {
    for (std::size_t j = 0; j < np; ++j) grad[j] = l2 * theta[j];
    std::vector<double> d(nc);
    for (std::size_t i = 0; i < n; ++i) {
      const double* p = prob.data() + i * nc;
      for (std::size_t c = 0; c < nc; ++c) d[c] = p[c] * inv_n;
      d[static_cast<std::size_t>(y[i])] -= inv_n;
      const float* xi = x + i * nf;
      for (std::size_t k = 0; k < nf; ++k) {
        if (xi[k] == 0.0f) continue;
        const double xk = xi[k];
        double* gk = grad + k * nc;
        for (std::size_t c = 0; c < nc; ++c) gk[c] += xk * d[c];
      }
      double* gb = grad + nf * nc;
      for (std::size_t c = 0; c < nc; ++c) gb[c] += d[c];
    }
  }

  if (hess) {
    // G[(k, l)][(a, b)] = sum_i x_ik x_il w_ab(i) for k >= l and a <= b: one row of `stride`
    // pair weights per feature pair, accumulated example by example over the non-zero
    // features only (half the pixels are zero, so a quarter of the feature pairs), an axpy
    // over the pairs that vectorizes. The Hessian's blocks are read from it afterwards.
    const std::size_t pairs = nc * (nc + 1) / 2;
    const std::size_t stride = (pairs + 7) / 8 * 8;
    std::vector<double> gram(rows * (rows + 1) / 2 * stride, 0.0), w(stride, 0.0);
    std::vector<std::size_t> nz;
    std::vector<double> xv;
    nz.reserve(rows);
    xv.reserve(rows);
    for (std::size_t i = 0; i < n; ++i) {
      const double* p = prob.data() + i * nc;
      for (std::size_t a = 0, q = 0; a < nc; ++a)
        for (std::size_t b = a; b < nc; ++b, ++q) w[q] = (a == b ? p[a] : 0.0) - p[a] * p[b];
      nz.clear();
      xv.clear();
      const float* xi = x + i * nf;
      for (std::size_t k = 0; k < nf; ++k)
        if (xi[k] != 0.0f) {
          nz.push_back(k);
          xv.push_back(xi[k]);
        }
      nz.push_back(nf);
      xv.push_back(1.0);
      for (std::size_t u = 0; u < nz.size(); ++u) {
        const std::size_t k = nz[u];
        double* row = gram.data() + k * (k + 1) / 2 * stride;
        for (std::size_t v = 0; v <= u; ++v) {
          const double xx = xv[u] * xv[v];
          double* g = row + nz[v] * stride;
          for (std::size_t q = 0; q < stride; ++q) g[q] += xx * w[q];
        }
      }
    }
    // pair_index[a][b] for either order of a and b.
    std::vector<std::size_t> pair_index(nc * nc);
    for (std::size_t a = 0, q = 0; a < nc; ++a)
      for (std::size_t b = a; b < nc; ++b, ++q) pair_index[a * nc + b] = pair_index[b * nc + a] = q;
    for (std::size_t k = 0; k < rows; ++k)
      for (std::size_t l = 0; l <= k; ++l) {
        const double* g = gram.data() + (k * (k + 1) / 2 + l) * stride;
        for (std::size_t a = 0; a < nc; ++a)
          for (std::size_t b = 0; b < nc; ++b) {
            const double h = g[pair_index[a * nc + b]] * inv_n;
            hess[(k * nc + a) * np + l * nc + b] = h;
            hess[(l * nc + b) * np + k * nc + a] = h;
          }
      }
    for (std::size_t j = 0; j < np; ++j) hess[j * np + j] += l2;
  }
  return objective;
}

template class Model<float>;
template class Model<double>;

}  // namespace fo::demo
