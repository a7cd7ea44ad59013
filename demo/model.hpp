// The demo's models, in plain C++ on the CPU: softmax regression (64 -> 10) and a two-layer
// perceptron (64 -> hidden -> 10, tanh or ReLU), trained with the mean cross-entropy. All
// params live in one flat buffer (each tensor starting at a multiple of 16 elements), so an
// optimizer registers one slice per tensor and a gradient is one buffer of the same layout.
//
//   fo::demo::Model<float> m({fo::demo::ModelKind::mlp});
//   std::vector<float> p(m.num_params()), g(m.num_params());
//   m.init(p.data(), seed);
//   float loss = m.loss(p.data(), x, y, n, g.data());   // g = d(loss)/d(p)
//
// Templated on the arithmetic type: the demo uses float; the tests check the float gradient
// against the double one, and the double one against finite differences.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fo::demo {

enum class ModelKind { softmax, mlp };
enum class Activation { tanh, relu };

struct ModelSpec {
  ModelKind kind = ModelKind::softmax;
  int hidden = 64;                           // mlp only
  Activation activation = Activation::tanh;  // mlp only
};

/// "softmax" or "mlp".
const char* model_name(ModelKind kind);

/// One param tensor's place in the flat buffer.
struct TensorSlice {
  std::string name;                 // "W", "b" (softmax); "W1", "b1", "W2", "b2" (mlp)
  std::vector<std::int64_t> shape;  // weights are [in, out]
  std::size_t offset = 0;           // in elements
  std::size_t numel = 0;
};

struct Evaluation {
  double loss = 0;      // mean cross-entropy
  double accuracy = 0;  // fraction of argmax == label
};

template <class T>
class Model {
 public:
  explicit Model(ModelSpec spec);

  const ModelSpec& spec() const { return spec_; }
  const std::vector<TensorSlice>& tensors() const { return tensors_; }
  /// Elements of the flat param (and gradient) buffer, alignment padding included.
  std::size_t num_params() const { return size_; }

  /// Glorot-uniform weights (He-uniform before a ReLU), zero biases; padding zeroed.
  void init(T* params, std::uint64_t seed) const;

  /// The mean cross-entropy of n examples (x: n rows of kFeatures; y: labels). If `grad` is
  /// not null it receives the gradient with respect to params (overwritten, padding zero).
  T loss(const T* params, const float* x, const int* y, std::size_t n, T* grad) const;

  /// Loss and accuracy over n examples, without gradients.
  Evaluation evaluate(const T* params, const float* x, const int* y, std::size_t n) const;

 private:
  // Logits of n examples into logits_ (and the hidden activations into hidden_ for the mlp).
  void forward(const T* params, const float* x, std::size_t n) const;

  ModelSpec spec_;
  std::vector<TensorSlice> tensors_;
  std::size_t size_ = 0;
  // Scratch, reused across calls: a Model is not to be shared between threads.
  mutable std::vector<T> hidden_, logits_, delta_;
};

/// Softmax regression's full-batch objective for Newton's method, in double: the mean
/// cross-entropy of n examples (x: n rows of `features` values; y: labels in [0, classes))
/// plus (l2 / 2) |theta|^2, over theta = the weights and biases, (features + 1) x classes,
/// row-major: weight (k, c) at k * classes + c and the bias of class c at
/// features * classes + c. With kFeatures and kClasses that is the layout of Model's softmax
/// params (W [in, out], then b), whose first (kFeatures + 1) * kClasses elements it reads.
///
/// `grad` (if not null) receives the gradient, (features + 1) * classes values; `hess` (if not
/// null) the exact Hessian, row-major, that many squared:
///   H = (1/n) sum_i (diag(p_i) - p_i p_i^T) kron (x_i x_i^T) + l2 I   (x_i with a trailing 1),
/// ordered as theta (feature-major). The cross-entropy's Hessian is singular (along adding the
/// same vector to every class), so l2 > 0 makes H positive definite. It is built as the
/// classes * (classes + 1) / 2 distinct weighted Gram matrices X^T diag(w_ab) X, w_ab =
/// delta_ab p_a - p_a p_b, skipping zero features: for the digits (n = 1437, 650 unknowns) a
/// few tens of ms. Returns the objective. Throws std::invalid_argument for n == 0,
/// features < 1, classes < 2, l2 < 0 or a label out of range.
double softmax_objective(const double* theta, const float* x, const int* y, std::size_t n,
                         int features, int classes, double l2, double* grad, double* hess);

extern template class Model<float>;
extern template class Model<double>;

}  // namespace fo::demo
