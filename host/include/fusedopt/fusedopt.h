/* The C ABI of fusedopt: a thin, stable layer over the C++ host API for FFI (Python ctypes,
 * Rust, Julia) and C programs. No C++ exception crosses it: every failure is a status code,
 * and fo_last_error() gives the calling thread's message. The ABI only grows; fo_abi_version()
 * counts the additions.
 *
 *   fo_optimizer* opt;
 *   if (fo_optimizer_create("adam", FO_DEVICE_CPU, 0, &opt) != FO_OK) puts(fo_last_error());
 */
#ifndef FUSEDOPT_FUSEDOPT_H
#define FUSEDOPT_FUSEDOPT_H

#include <stdint.h>

#if defined(_WIN32)
#define FO_API __declspec(dllexport)
#else
#define FO_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fo_optimizer fo_optimizer;
typedef enum {
  FO_OK = 0,
  FO_INVALID_ARGUMENT = 1,
  FO_UNSUPPORTED = 2,
  FO_OUT_OF_MEMORY = 3,
  FO_DEVICE_ERROR = 4,
  FO_IO_ERROR = 5,
  FO_CORRUPT_DATA = 6
} fo_status;
typedef enum {
  FO_FLOAT32 = 0,
  FO_FLOAT16 = 1,
  FO_BFLOAT16 = 2,
  FO_INT32 = 3,
  FO_INT64 = 4,
  FO_QUANT8 = 5, /* optimizer states only: 8-bit block-quantized (state_dtype) */
  FO_QUANT4 = 6  /* optimizer states only: 4-bit block-quantized (state_dtype) */
} fo_dtype;
typedef enum { FO_DEVICE_CPU = 0, FO_DEVICE_CUDA = 1 } fo_device;

FO_API int fo_abi_version(void);
/* The calling thread's last failure message ("" if none); valid until its next fo_ call. */
FO_API const char* fo_last_error(void);
/* 0 when built without CUDA or no GPU is present. */
FO_API int fo_cuda_device_count(void);

/* algorithm: a name from docs/optimizers.md ("sgd", "adam", ...). */
FO_API fo_status fo_optimizer_create(const char* algorithm, fo_device device, int device_index,
                                     fo_optimizer** out);
FO_API void fo_optimizer_destroy(fo_optimizer* opt);
FO_API fo_status fo_optimizer_set_option(fo_optimizer* opt, const char* key, double value);
FO_API fo_status fo_optimizer_get_option(const fo_optimizer* opt, const char* key, double* value);
FO_API fo_status fo_optimizer_add_param(fo_optimizer* opt, const char* name, void* data,
                                        fo_dtype dtype, int ndim, const int64_t* shape);
FO_API fo_status fo_optimizer_set_param_option(fo_optimizer* opt, const char* name, const char* key,
                                               double value);
/* grads[i] belongs to the i-th added param; NULL entries are skipped. stream: cudaStream_t. */
FO_API fo_status fo_optimizer_step(fo_optimizer* opt, const void* const* grads, void* stream);
FO_API fo_status fo_optimizer_step_sparse(fo_optimizer* opt, const char* name, const void* indices,
                                          fo_dtype index_dtype, int64_t nnz, const void* grad_rows,
                                          void* stream);
FO_API fo_status fo_optimizer_get_state(const fo_optimizer* opt, const char* name,
                                        const char* state, float* out, int64_t numel);
FO_API fo_status fo_optimizer_step_count(const fo_optimizer* opt, const char* name, int64_t* step);
FO_API fo_status fo_optimizer_save(const fo_optimizer* opt, const char* path);
FO_API fo_status fo_optimizer_load(fo_optimizer* opt, const char* path);

/* ABI version 2. Step settings are option keys of every algorithm: grad_scale,
 * max_grad_norm, skip_nonfinite, master_weights, state_dtype, fp32_grads,
 * stochastic_rounding, seed (see fusedopt/optimizer.hpp); ema_decay since version 5. */

/* CUDA, for capturable steps: a factor on every param's lr read from device memory at run
 * time, an extra device-side gradient multiplier, and a found_inf flag (non-zero: skip the
 * step). NULL: unused. */
FO_API fo_status fo_optimizer_set_device_scalars(fo_optimizer* opt, const float* d_lr,
                                                 const float* d_grad_multiplier,
                                                 float* d_found_inf);
/* The global gradient norm of the last step that computed one (NaN if none). */
FO_API fo_status fo_optimizer_grad_norm(const fo_optimizer* opt, float* out);

/* ABI version 3. Learning-rate schedules (fusedopt/schedule.hpp), given as spec strings
 * "kind:key=value,...", e.g. "warmup_cosine:lr=3e-4,warmup=100,total=5000". Each call parses
 * and validates the spec. */

/* The lr of the step-th optimizer step (step >= 1). */
FO_API fo_status fo_schedule_lr(const char* spec, int64_t step, double* out);
/* CUDA: enqueues on stream (a cudaStream_t, NULL: default) one thread that writes the lr of
 * step *d_step + 1 to *d_lr (both device memory), for capture in a CUDA graph. Pass d_lr to
 * fo_optimizer_set_device_scalars and set the lr option to 1. FO_UNSUPPORTED without CUDA. */
FO_API fo_status fo_schedule_to_device(const char* spec, const int64_t* d_step, float* d_lr,
                                       void* stream);

/* ABI version 4. The number of values fo_optimizer_get_state copies: the param's element
 * count, or its rows (shape[0]) for a row-wise state (adagrad with option rowwise = 1). */
FO_API fo_status fo_optimizer_state_numel(const fo_optimizer* opt, const char* name,
                                          const char* state, int64_t* numel);

/* ABI version 5. The weight EMA (step setting ema_decay > 0, state "ema"): exchange every
 * param with its EMA (twice restores both, bitwise), or copy the EMA into the params
 * (fusedopt/optimizer.hpp, Optimizer::swap_ema). stream: a cudaStream_t on CUDA, or NULL. */
FO_API fo_status fo_optimizer_swap_ema(fo_optimizer* opt, void* stream);
FO_API fo_status fo_optimizer_copy_ema_to_params(fo_optimizer* opt, void* stream);

/* ABI version 6. Schedule-Free (sgd_schedule_free, adamw_schedule_free): put the params'
 * evaluation form in them (keeping their training form), or the training form back, bitwise
 * (fusedopt/optimizer.hpp, Optimizer::eval). A step in eval mode is FO_INVALID_ARGUMENT;
 * other algorithms: FO_UNSUPPORTED. stream: a cudaStream_t on CUDA, or NULL. */
FO_API fo_status fo_optimizer_eval(fo_optimizer* opt, void* stream);
FO_API fo_status fo_optimizer_train(fo_optimizer* opt, void* stream);

/* ABI version 7. Several algorithms in one optimizer (Muon for the hidden matrices, AdamW for
 * the rest): the param is stepped by `algorithm` (a registered name; NULL or "": the
 * optimizer's own), its options starting from that algorithm's defaults, which
 * fo_optimizer_set_option sets as "adamw.lr" (fusedopt/optimizer.hpp, Optimizer::add_param).
 * fo_optimizer_param_algorithm: the algorithm that steps param `name`, valid as long as
 * the optimizer. */
FO_API fo_status fo_optimizer_add_param_with(fo_optimizer* opt, const char* name,
                                             const char* algorithm, void* data, fo_dtype dtype,
                                             int ndim, const int64_t* shape);
FO_API fo_status fo_optimizer_param_algorithm(const fo_optimizer* opt, const char* name,
                                              const char** out);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDOPT_FUSEDOPT_H */
