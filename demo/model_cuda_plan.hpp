// The GPU models' computation (model_cuda.hpp) as a sequence of column-major GEMMs and small
// per-element steps, generic over what executes them: model_cuda.cu runs it with cuBLAS SGEMM
// and CUDA kernels on one stream; tests/demo_test.cpp runs it with plain loops that follow the
// BLAS definition literally, which checks every GEMM's transposes, m, n, k and leading
// dimensions against the CPU Model on a machine without a GPU. The per-element math (the
// activations and their derivatives, the softmax cross-entropy of one example) is here once,
// for the kernels and that check alike, written as model.cpp writes it.
//
// Layout. Every matrix is row-major, as in model.hpp: a batch x is n rows of kFeatures, the
// hidden activations n rows of H, the logits n rows of kClasses, a weight [in, out] is `in`
// rows of `out` at its TensorSlice offset in the flat params (and its gradient at the same
// offset in the flat gradient). cuBLAS is column-major, and a row-major r x c matrix (leading
// dimension c) read column-major is its transpose, c x r with leading dimension c. So the
// row-major product C = A B (A r x k, B k x c) is the column-major C^T = B^T A^T: one gemm with
// the operands swapped, m = c, n = r, k = k, every leading dimension the row length of the
// row-major matrix, and op N for both. A row-major operand that the product uses transposed
// (X^T, W^T) is op T of its column-major view. Each call below spells its mapping out.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "data.hpp"
#include "model.hpp"

#if defined(__CUDACC__)
#define FO_DEMO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FO_DEMO_HOST_DEVICE inline
#endif

namespace fo::demo::gpu {

/// A GEMM operand as stored (n) or transposed (t): cuBLAS's CUBLAS_OP_N and CUBLAS_OP_T.
enum class Op { n, t };

/// The function after a bias add: the hidden layer's activation, or none for the logits.
enum class Pointwise { identity, tanh, relu };

inline Pointwise pointwise(Activation a) {
  return a == Activation::tanh ? Pointwise::tanh : Pointwise::relu;
}

/// f(v); relu as std::max(v, 0) in model.cpp (which keeps a NaN).
FO_DEMO_HOST_DEVICE float activate(Pointwise f, float v) {
  if (f == Pointwise::tanh) return tanhf(v);
  if (f == Pointwise::relu) return v < 0.0f ? 0.0f : v;
  return v;
}

/// The gradient through f from its output h = f(a): tanh' = 1 - h^2, relu' = [h > 0].
FO_DEMO_HOST_DEVICE float activation_backward(Pointwise f, float back, float h) {
  if (f == Pointwise::tanh) return back * (1.0f - h * h);
  if (f == Pointwise::relu) return h > 0.0f ? back : 0.0f;
  return back;
}

/// -log(softmax(z)[y]) of one example's kClasses logits, through the log-sum-exp with the max
/// subtracted (model.cpp's cross_entropy). With `grad`, z is overwritten by
/// d(mean loss)/dz = (softmax(z) - onehot(y)) * inv_n, as Model::loss computes it. A label out
/// of range gives NaN (and a NaN gradient) rather than a read out of bounds.
FO_DEMO_HOST_DEVICE float softmax_xent_row(float* z, int y, float inv_n, bool grad) {
  if (y < 0 || y >= kClasses) {
    const float nan = NAN;
    if (grad)
      for (int c = 0; c < kClasses; ++c) z[c] = nan;
    return nan;
  }
  float m = z[0];
  for (int c = 1; c < kClasses; ++c)
    if (m < z[c]) m = z[c];
  float s = 0.0f;
  for (int c = 0; c < kClasses; ++c) s += expf(z[c] - m);
  const float loss = m + logf(s) - z[y];
  if (grad) {
    for (int c = 0; c < kClasses; ++c) z[c] = expf(z[c] - m) / s;
    z[y] -= 1.0f;
    for (int c = 0; c < kClasses; ++c) z[c] *= inv_n;
  }
  return loss;
}

/// Device (or, for the host check, host) scratch of a batch of n examples.
struct Scratch {
  float* hidden;    // n x H: the activations h = f(x W1 + b1) (mlp only)
  float* dhidden;   // n x H: d(loss)/dh, then d(loss)/d(x W1 + b1) in place (mlp only)
  float* logits;    // n x kClasses: the logits, then d(loss)/d(logits) in place
  float* row_loss;  // n: each example's cross-entropy (when the loss is asked for)
};

/// The loss of n examples (x: n rows of kFeatures; y: labels) at `params` in Model's flat
/// layout (`tensors`, num_params elements), and its gradient. With `loss` (not null), *loss
/// receives the mean cross-entropy; with `grad` (not null), grad (num_params elements) is
/// overwritten with d(mean loss)/d(params), padding zero. Exec provides, on one stream:
///
///   gemm(Op ta, Op tb, int m, int n, int k, const float* a, int lda, const float* b,
///        int ldb, float* c, int ldc)          C = op(A) op(B), column-major (alpha 1, beta 0)
///   zero(float* p, std::size_t count)
///   bias_activation(float* a, const float* bias, int rows, int cols, Pointwise f)
///                                            a[i][j] = f(a[i][j] + bias[j]), row-major
///   activation_backward(float* d, const float* h, std::size_t count, Pointwise f)
///                                            d = activation_backward(f, d, h), elementwise
///   softmax_xent(float* z, const int* y, int n, float inv_n, float* row_loss, bool grad)
///                                            softmax_xent_row of each row of z; row_loss[i]
///                                            its loss when row_loss is not null
///   column_sum(const float* a, int rows, int cols, float* out)
///                                            out[j] = sum over i of a[i][j], row-major
///   mean(const float* v, int n, float* out)  *out = (float)(sum of v in double / n)
template <class Exec>
void forward_backward(Exec& e, const ModelSpec& spec, const std::vector<TensorSlice>& tensors,
                      std::size_t num_params, int n, const float* params, const float* x,
                      const int* y, const Scratch& s, float* grad, float* loss) {
  constexpr int F = kFeatures, C = kClasses;
  float* z = s.logits;
  // ---- forward: the logits z (n x C), and for the mlp the hidden activations h (n x H).
  if (spec.kind == ModelKind::softmax) {
    const float* w = params + tensors[0].offset;  // F x C
    const float* b = params + tensors[1].offset;
    // z (n x C) = x (n x F) W (F x C); column-major z^T (C x n) = W^T (C x F) x^T (F x n):
    // A = W read column-major (C x F, ld C), op N; B = x (F x n, ld F), op N; C = z (ld C).
    e.gemm(Op::n, Op::n, /*m=*/C, /*n=*/n, /*k=*/F, w, /*lda=*/C, x, /*ldb=*/F, z, /*ldc=*/C);
    e.bias_activation(z, b, n, C, Pointwise::identity);
  } else {
    const int H = spec.hidden;
    const Pointwise f = pointwise(spec.activation);
    const float* w1 = params + tensors[0].offset;  // F x H
    const float* b1 = params + tensors[1].offset;
    const float* w2 = params + tensors[2].offset;  // H x C
    const float* b2 = params + tensors[3].offset;
    // a (n x H) = x (n x F) W1 (F x H); column-major a^T (H x n) = W1^T (H x F) x^T (F x n):
    // A = W1 (H x F, ld H), op N; B = x (F x n, ld F), op N; C = hidden (H x n, ld H).
    e.gemm(Op::n, Op::n, /*m=*/H, /*n=*/n, /*k=*/F, w1, /*lda=*/H, x, /*ldb=*/F, s.hidden,
           /*ldc=*/H);
    e.bias_activation(s.hidden, b1, n, H, f);  // h = f(a + b1)
    // z (n x C) = h (n x H) W2 (H x C); column-major z^T (C x n) = W2^T (C x H) h^T (H x n):
    // A = W2 (C x H, ld C), op N; B = hidden (H x n, ld H), op N; C = z (C x n, ld C).
    e.gemm(Op::n, Op::n, /*m=*/C, /*n=*/n, /*k=*/H, w2, /*lda=*/C, s.hidden, /*ldb=*/H, z,
           /*ldc=*/C);
    e.bias_activation(z, b2, n, C, Pointwise::identity);
  }

  // ---- the loss, and z becomes delta = d(mean loss)/dz = (softmax(z) - onehot(y)) / n.
  e.softmax_xent(z, y, n, 1.0f / static_cast<float>(n), loss ? s.row_loss : nullptr,
                 grad != nullptr);
  if (loss) e.mean(s.row_loss, n, loss);
  if (!grad) return;
  const float* d = z;  // n x C

  // ---- backward. The padding between tensors stays zero; the GEMMs (beta 0) and the column
  // sums overwrite every element of each tensor.
  e.zero(grad, num_params);
  if (spec.kind == ModelKind::softmax) {
    float* dw = grad + tensors[0].offset;
    float* db = grad + tensors[1].offset;
    // dW (F x C) = x^T (F x n) delta (n x C); column-major dW^T (C x F) = delta^T (C x n) x
    // (n x F): A = delta read column-major (C x n, ld C), op N; B = x read column-major is
    // x^T (F x n, ld F), so op T gives x (n x F); C = dW (C x F, ld C).
    e.gemm(Op::n, Op::t, /*m=*/C, /*n=*/F, /*k=*/n, d, /*lda=*/C, x, /*ldb=*/F, dw, /*ldc=*/C);
    e.column_sum(d, n, C, db);  // db = the column sums of delta
    return;
  }
  const int H = spec.hidden;
  const Pointwise f = pointwise(spec.activation);
  const float* w2 = params + tensors[2].offset;
  float* dw1 = grad + tensors[0].offset;
  float* db1 = grad + tensors[1].offset;
  float* dw2 = grad + tensors[2].offset;
  float* db2 = grad + tensors[3].offset;
  // dW2 (H x C) = h^T (H x n) delta (n x C); column-major dW2^T (C x H) = delta^T (C x n)
  // h (n x H): A = delta (C x n, ld C), op N; B = hidden read column-major is h^T (H x n, ld H),
  // op T gives h; C = dW2 (C x H, ld C).
  e.gemm(Op::n, Op::t, /*m=*/C, /*n=*/H, /*k=*/n, d, /*lda=*/C, s.hidden, /*ldb=*/H, dw2,
         /*ldc=*/C);
  e.column_sum(d, n, C, db2);
  // dh (n x H) = delta (n x C) W2^T (C x H); column-major dh^T (H x n) = W2 (H x C) delta^T
  // (C x n): A = W2 read column-major is W2^T (C x H, ld C), op T gives W2 (H x C, so k = C);
  // B = delta (C x n, ld C), op N; C = dhidden (H x n, ld H).
  e.gemm(Op::t, Op::n, /*m=*/H, /*n=*/n, /*k=*/C, w2, /*lda=*/C, d, /*ldb=*/C, s.dhidden,
         /*ldc=*/H);
  // Through the activation, from its output: da = dh * f'(a), in place.
  e.activation_backward(s.dhidden, s.hidden, static_cast<std::size_t>(n) * H, f);
  // dW1 (F x H) = x^T (F x n) da (n x H); column-major dW1^T (H x F) = da^T (H x n) x (n x F):
  // A = dhidden (H x n, ld H), op N; B = x read column-major is x^T (F x n, ld F), op T gives
  // x; C = dW1 (H x F, ld H).
  e.gemm(Op::n, Op::t, /*m=*/H, /*n=*/F, /*k=*/n, s.dhidden, /*lda=*/H, x, /*ldb=*/F, dw1,
         /*ldc=*/H);
  e.column_sum(s.dhidden, n, H, db1);
}

}  // namespace fo::demo::gpu
