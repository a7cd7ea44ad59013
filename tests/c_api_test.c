/* A test of fusedopt's C ABI (fusedopt/fusedopt.h), in plain C11, through the header only.
 * Each CHECK records a pass or a failure (with file:line) and carries on; the program ends
 * with exactly one line "N passed, M failed" on stdout and returns 0 only if M == 0.
 * Random inputs come from an LCG seeded from time(NULL) (or argv[1]); the seed goes to stderr. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fusedopt/fusedopt.h"

/* ---- harness ---------------------------------------------------------------------------- */

static int g_passed, g_failed;

static void report(int ok, const char* file, int line, const char* what, const char* detail) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    fprintf(stderr, "%s:%d: CHECK failed: %s%s\n", file, line, what, detail);
  }
}

/* Passes if `got` is `want` or `alt`; a failure status must also come with a message. */
static void check_status(fo_status got, fo_status want, fo_status alt, const char* call,
                         const char* file, int line) {
  const char* msg = fo_last_error();
  char detail[512];
  snprintf(detail, sizeof detail, " (returned %d, last error \"%s\")", (int)got, msg ? msg : "");
  report((got == want || got == alt) && (got == FO_OK || (msg && msg[0])), file, line, call,
         detail);
}

#define CHECK(cond) report((cond) != 0, __FILE__, __LINE__, #cond, "")
#define CHECK_STATUS(call, want) check_status((call), (want), (want), #call, __FILE__, __LINE__)
#define CHECK_STATUS2(call, want, alt) \
  check_status((call), (want), (alt), #call, __FILE__, __LINE__)
#define OK FO_OK
#define INVALID FO_INVALID_ARGUMENT

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t g_rng;

/* Uniform in [-1, 1), exactly representable as float (24 random bits). */
static float rnd(void) {
  g_rng = g_rng * 6364136223846793005ULL + 1442695040888963407ULL;
  return (float)((double)(g_rng >> 40) / 16777216.0 * 2.0 - 1.0);
}

static void fill(float* a, int n) {
  for (int i = 0; i < n; ++i) a[i] = rnd();
}

static fo_optimizer* make(const char* algorithm, double lr) { /* lr < 0: keep the default */
  fo_optimizer* opt = NULL;
  CHECK_STATUS(fo_optimizer_create(algorithm, FO_DEVICE_CPU, 0, &opt), OK);
  if (lr >= 0) CHECK_STATUS(fo_optimizer_set_option(opt, "lr", lr), OK);
  return opt;
}

static fo_status add1(fo_optimizer* opt, const char* name, void* data, int64_t n) {
  return fo_optimizer_add_param(opt, name, data, FO_FLOAT32, 1, &n);
}

static fo_status step2(fo_optimizer* opt, const void* g0, const void* g1) {
  const void* grads[2] = {g0, g1};
  return fo_optimizer_step(opt, grads, NULL);
}

static int64_t steps_of(const fo_optimizer* opt, const char* name) {
  int64_t s = -1;
  return fo_optimizer_step_count(opt, name, &s) == OK ? s : -1;
}

/* A bitwise snapshot of one param's data, one of its states (or none), and its step count. */
enum { SNAP_MAX = 1024 };
typedef struct {
  const fo_optimizer* opt;
  const char *name, *state;
  const float* data;
  int64_t n, steps;
  float data_copy[SNAP_MAX], state_copy[SNAP_MAX];
} snapshot;

static void snap_take(snapshot* s, const fo_optimizer* opt, const char* name, const float* data,
                      int64_t n, const char* state) {
  s->opt = opt, s->name = name, s->state = state, s->data = data, s->n = n;
  s->steps = steps_of(opt, name);
  memcpy(s->data_copy, data, (size_t)n * sizeof(float));
  if (state) CHECK_STATUS(fo_optimizer_get_state(opt, name, state, s->state_copy, n), OK);
}

static int snap_same(const snapshot* s) {
  float now[SNAP_MAX];
  if (memcmp(s->data_copy, s->data, (size_t)s->n * sizeof(float)) != 0) return 0;
  if (steps_of(s->opt, s->name) != s->steps) return 0;
  if (!s->state) return 1;
  if (fo_optimizer_get_state(s->opt, s->name, s->state, now, s->n) != OK) return 0;
  return memcmp(s->state_copy, now, (size_t)s->n * sizeof(float)) == 0;
}

/* Number of i with p[i] != fmaf(-lr, g[i], p_old[i]) bitwise (SGD's update, in fp32). */
static int sgd_mismatches(const float* p, const float* p_old, const float* g, float lr, int n) {
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    float want = fmaf(-lr, g[i], p_old[i]);
    bad += memcmp(&p[i], &want, sizeof(float)) != 0;
  }
  return bad;
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_basics_and_create(void) {
  static const char* const names[] = {"sgd",  "adagrad", "adadelta", "rmsprop",
                                      "adam", "adamw",   "rprop",    "lion"};
  fo_optimizer* opt = NULL;
  CHECK(fo_abi_version() >= 1);
  CHECK(fo_cuda_device_count() >= 0);
  fo_optimizer_destroy(NULL); /* harmless */
  CHECK_STATUS(fo_optimizer_step(NULL, NULL, NULL), INVALID);
  for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i) {
    opt = NULL;
    CHECK_STATUS(fo_optimizer_create(names[i], FO_DEVICE_CPU, 0, &opt), OK);
    CHECK(opt != NULL);
    fo_optimizer_destroy(opt);
  }
  CHECK_STATUS(fo_optimizer_create("adamax_nope", FO_DEVICE_CPU, 0, &opt), INVALID);
  CHECK(fo_last_error()[0] != '\0');
  CHECK_STATUS(fo_optimizer_create("adam", FO_DEVICE_CPU, 0, NULL), INVALID);
  CHECK_STATUS(fo_optimizer_create(NULL, FO_DEVICE_CPU, 0, &opt), INVALID);
  int ngpu = fo_cuda_device_count();
  if (ngpu == 0)
    CHECK_STATUS2(fo_optimizer_create("adam", FO_DEVICE_CUDA, 0, &opt), FO_UNSUPPORTED, INVALID);
  else
    CHECK_STATUS(fo_optimizer_create("adam", FO_DEVICE_CUDA, ngpu, &opt), INVALID);
}

static void test_options(void) {
  static const struct {
    const char *algorithm, *key;
    double value;
  } defaults[] = {
      {"sgd", "lr", 1e-3},
      {"sgd", "momentum", 0},
      {"sgd", "nesterov", 0},
      {"adagrad", "lr", 1e-2},
      {"adagrad", "eps", 1e-10},
      {"adadelta", "lr", 1.0},
      {"adadelta", "rho", 0.9},
      {"adadelta", "eps", 1e-6},
      {"rmsprop", "lr", 1e-2},
      {"rmsprop", "alpha", 0.99},
      {"rmsprop", "eps", 1e-8},
      {"adam", "lr", 1e-3},
      {"adam", "beta1", 0.9},
      {"adam", "beta2", 0.999},
      {"adam", "eps", 1e-8},
      {"adam", "weight_decay", 0},
      {"adam", "amsgrad", 0},
      {"adamw", "lr", 1e-3},
      {"adamw", "weight_decay", 1e-2},
      {"rprop", "lr", 1e-2},
      {"rprop", "eta_minus", 0.5},
      {"rprop", "eta_plus", 1.2},
      {"rprop", "step_size_max", 50},
      {"lion", "lr", 1e-4},
      {"lion", "beta1", 0.9},
      {"lion", "beta2", 0.99},
  };
  double v;
  for (size_t i = 0; i < sizeof defaults / sizeof defaults[0]; ++i) {
    fo_optimizer* opt = make(defaults[i].algorithm, -1);
    v = -12345.0;
    CHECK_STATUS(fo_optimizer_get_option(opt, defaults[i].key, &v), OK);
    if (v != defaults[i].value)
      fprintf(stderr, "  %s %s: got %.17g, documented default %.17g\n", defaults[i].algorithm,
              defaults[i].key, v, defaults[i].value);
    CHECK(v == defaults[i].value);
    fo_optimizer_destroy(opt);
  }

  fo_optimizer* opt = make("adam", 3e-4);
  CHECK_STATUS(fo_optimizer_get_option(opt, "lr", &v), OK);
  CHECK(v == 3e-4);
  CHECK_STATUS(fo_optimizer_set_option(opt, "amsgrad", 1.0), OK);
  CHECK_STATUS(fo_optimizer_get_option(opt, "amsgrad", &v), OK);
  CHECK(v == 1.0);
  CHECK_STATUS(fo_optimizer_get_option(opt, "no_such_key", &v), INVALID);
  CHECK_STATUS(fo_optimizer_get_option(opt, "lr", NULL), INVALID);
  /* Rejected sets: the option keeps its old value. */
  CHECK_STATUS(fo_optimizer_set_option(opt, "no_such_key", 1.0), INVALID);
  CHECK_STATUS(fo_optimizer_set_option(opt, "momentum", 0.9), INVALID); /* sgd's, not adam's */
  CHECK_STATUS(fo_optimizer_set_option(opt, "lr", NAN), INVALID);
  CHECK_STATUS(fo_optimizer_set_option(opt, "lr", INFINITY), INVALID);
  CHECK_STATUS(fo_optimizer_set_option(opt, "lr", -1e-3), INVALID);
  CHECK_STATUS(fo_optimizer_get_option(opt, "lr", &v), OK);
  CHECK(v == 3e-4);
  CHECK_STATUS(fo_optimizer_set_option(opt, "beta1", 1.0), INVALID);
  CHECK_STATUS(fo_optimizer_get_option(opt, "beta1", &v), OK);
  CHECK(v == 0.9);
  CHECK_STATUS(fo_optimizer_set_option(opt, "amsgrad", 0.5), INVALID);
  CHECK_STATUS(fo_optimizer_get_option(opt, "amsgrad", &v), OK);
  CHECK(v == 1.0);
  fo_optimizer_destroy(opt);

  opt = make("sgd", -1); /* nesterov requires momentum > 0 */
  CHECK_STATUS(fo_optimizer_set_option(opt, "nesterov", 1.0), INVALID);
  CHECK_STATUS(fo_optimizer_get_option(opt, "nesterov", &v), OK);
  CHECK(v == 0.0);
  fo_optimizer_destroy(opt);
}

enum { N_SGD = 37 };

static void test_sgd(void) {
  float p[N_SGD], p0[N_SGD], g[N_SGD], g2[N_SGD], b[N_SGD], b1[N_SGD], other[N_SGD];
  const float lr = (float)0.1;
  const void* grads[1];

  /* Plain SGD: p = fma(-lr, g, p) in fp32, bitwise. */
  fo_optimizer* opt = make("sgd", 0.1);
  CHECK_STATUS(fo_optimizer_set_option(opt, "momentum", 0.0), OK);
  fill(p, N_SGD), fill(g, N_SGD), memcpy(p0, p, sizeof p);
  CHECK_STATUS(add1(opt, "w", p, N_SGD), OK);
  CHECK(steps_of(opt, "w") == 0);
  grads[0] = g;
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK(steps_of(opt, "w") == 1);
  CHECK(sgd_mismatches(p, p0, g, lr, N_SGD) == 0);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "momentum_buffer", b, N_SGD), INVALID);
  fo_optimizer_destroy(opt);

  /* Momentum 0.9: b = g on step 1, then b = 0.9 b + g; p = fma(-lr, b, p). */
  opt = make("sgd", 0.1);
  CHECK_STATUS(fo_optimizer_set_option(opt, "momentum", 0.9), OK);
  fill(p, N_SGD), fill(g, N_SGD), fill(g2, N_SGD), memcpy(p0, p, sizeof p);
  CHECK_STATUS(add1(opt, "w", p, N_SGD), OK);
  CHECK(steps_of(opt, "w") == 0);
  grads[0] = g;
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK(steps_of(opt, "w") == 1);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "momentum_buffer", b1, N_SGD), OK);
  CHECK(memcmp(b1, g, sizeof b1) == 0);
  CHECK(sgd_mismatches(p, p0, g, lr, N_SGD) == 0);

  memcpy(p0, p, sizeof p);
  grads[0] = g2;
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK(steps_of(opt, "w") == 2);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "momentum_buffer", b, N_SGD), OK);
  int bad = 0;
  for (int i = 0; i < N_SGD; ++i) { /* relative to the terms' size: robust to cancellation */
    double ref = 0.9 * (double)b1[i] + (double)g2[i];
    double scale = fabs(0.9 * (double)b1[i]) + fabs((double)g2[i]);
    bad += !(fabs((double)b[i] - ref) <= 1e-6 * scale);
  }
  CHECK(bad == 0);
  CHECK(sgd_mismatches(p, p0, b, lr, N_SGD) == 0); /* p moved by the new buffer */

  /* Rejected calls on a stepped optimizer: param, state and step count bitwise unchanged. */
  snapshot s;
  snap_take(&s, opt, "w", p, N_SGD, "momentum_buffer");
  CHECK_STATUS(fo_optimizer_set_option(opt, "lr", -1.0), INVALID);
  CHECK(snap_same(&s));
  CHECK_STATUS(fo_optimizer_set_option(opt, "beta1", 0.5), INVALID);
  CHECK(snap_same(&s));
  CHECK_STATUS(add1(opt, "w", other, N_SGD), INVALID);
  CHECK(snap_same(&s));
  CHECK_STATUS(fo_optimizer_set_param_option(opt, "nope", "lr", 0.2), INVALID);
  CHECK(snap_same(&s));
  CHECK_STATUS(fo_optimizer_step(opt, NULL, NULL), INVALID); /* the grads array is null */
  CHECK(snap_same(&s));
  grads[0] = (const char*)g2 + 1; /* a misaligned gradient */
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), INVALID);
  CHECK(snap_same(&s));
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "momentum_buffer", other, N_SGD - 1), INVALID);
  CHECK(snap_same(&s));
  fo_optimizer_destroy(opt);
}

static void test_null_grad(void) {
  float a[10], b[7], ga[10], gb[7], a0[10];
  fill(a, 10), fill(b, 7), fill(ga, 10), fill(gb, 7), memcpy(a0, a, sizeof a);
  fo_optimizer* opt = make("adam", -1);
  CHECK_STATUS(add1(opt, "a", a, 10), OK);
  CHECK_STATUS(add1(opt, "b", b, 7), OK);
  snapshot sa, sb;
  snap_take(&sb, opt, "b", b, 7, "exp_avg");
  CHECK_STATUS(step2(opt, ga, NULL), OK);
  CHECK(steps_of(opt, "a") == 1);
  CHECK(memcmp(a, a0, sizeof a) != 0); /* a moved */
  CHECK(snap_same(&sb));               /* b, its state and its step count did not */
  CHECK(steps_of(opt, "b") == 0);

  snap_take(&sa, opt, "a", a, 10, "exp_avg_sq");
  CHECK_STATUS(step2(opt, NULL, gb), OK);
  CHECK(snap_same(&sa));
  CHECK(steps_of(opt, "a") == 1);
  CHECK(steps_of(opt, "b") == 1);
  fo_optimizer_destroy(opt);
}

enum { N_ADAM = 1000 };

static void test_adam(void) {
  static float p[N_ADAM], p0[N_ADAM], g[N_ADAM], m[N_ADAM];
  const int64_t shape[2] = {40, 25};
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  fill(p, N_ADAM), fill(g, N_ADAM), memcpy(p0, p, sizeof p);
  fo_optimizer* opt = make("adam", lr);
  CHECK_STATUS(fo_optimizer_add_param(opt, "w", p, FO_FLOAT32, 2, shape), OK);
  const void* grads[1] = {g};
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "exp_avg", m, N_ADAM), OK);
  int bad_p = 0, bad_m = 0;
  for (int i = 0; i < N_ADAM; ++i) { /* adam at t = 1 from zero state, in double */
    double gi = g[i], mi = (1 - beta1) * gi, vi = (1 - beta2) * gi * gi;
    double denom = sqrt(vi) / sqrt(1 - beta2) + eps;
    double ref = (double)p0[i] - (lr / (1 - beta1)) * mi / denom;
    if (!(fabs((double)p[i] - ref) <= 1e-6 + 1e-5 * fabs(ref)) && bad_p++ == 0)
      fprintf(stderr, "  adam p[%d] = %.9g, reference %.9g\n", i, p[i], ref);
    bad_m += !(fabs((double)m[i] - mi) <= 1e-6 * fabs(mi));
  }
  CHECK(bad_p == 0);
  CHECK(bad_m == 0);
  fo_optimizer_destroy(opt);
}

static void test_add_param_errors(void) {
  float w[16], w0[16], g[16], other[16];
  const int64_t neg[2] = {4, -1}, four = 4;
  fill(w, 16), fill(g, 16), memcpy(w0, w, sizeof w), memcpy(other, w, sizeof w);
  fo_optimizer* opt = make("sgd", 0.1);
  CHECK_STATUS(add1(opt, "w", w, 16), OK);
  CHECK_STATUS(add1(opt, "w", other, 16), INVALID); /* duplicate name */
  CHECK_STATUS(add1(opt, "n1", NULL, 4), INVALID);
  CHECK(steps_of(opt, "n1") == -1);
  CHECK_STATUS(fo_optimizer_add_param(opt, "n2", other, FO_FLOAT32, 2, neg), INVALID);
  CHECK(steps_of(opt, "n2") == -1);
  CHECK_STATUS(add1(opt, "n3", (char*)other + 1, 4), INVALID); /* misaligned */
  CHECK(steps_of(opt, "n3") == -1);
  CHECK_STATUS(fo_optimizer_add_param(opt, "n4", other, FO_INT32, 1, &four), INVALID);
  CHECK(steps_of(opt, "n4") == -1);
  /* bfloat16 misaligned to its 2 bytes (a bfloat16 param itself is fine on both backends) */
  CHECK_STATUS(fo_optimizer_add_param(opt, "n5", (char*)other + 1, FO_BFLOAT16, 1, &four), INVALID);
  CHECK(steps_of(opt, "n5") == -1);
  CHECK_STATUS(fo_optimizer_add_param(opt, "n6", other, FO_FLOAT32, -1, &four), INVALID);
  CHECK(steps_of(opt, "n6") == -1);
  CHECK_STATUS(add1(opt, NULL, other, 4), INVALID);
  CHECK_STATUS(add1(opt, "", other, 4), INVALID);
  /* Still exactly one param, "w", on its own buffer: a one-entry grads array steps it. */
  const void* grads[1] = {g};
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK(steps_of(opt, "w") == 1);
  CHECK(sgd_mismatches(w, w0, g, (float)0.1, 16) == 0);
  CHECK(memcmp(other, w0, sizeof w0) == 0); /* the rejected duplicate's buffer is untouched */
  fo_optimizer_destroy(opt);
}

static void test_param_option(void) {
  float a[8], b[8], a0[8], b0[8], ga[8], gb[8];
  double v = 0.0;
  fill(a, 8), fill(b, 8);
  fo_optimizer* opt = make("sgd", 0.1);
  CHECK_STATUS(add1(opt, "a", a, 8), OK);
  CHECK_STATUS(add1(opt, "b", b, 8), OK);
  CHECK_STATUS(fo_optimizer_set_param_option(opt, "b", "lr", 0.5), OK);
  CHECK_STATUS(fo_optimizer_set_param_option(opt, "zz", "lr", 0.5), INVALID);
  CHECK_STATUS(fo_optimizer_set_param_option(opt, "a", "beta1", 0.5), INVALID);
  CHECK_STATUS(fo_optimizer_set_param_option(opt, "a", "lr", -0.5), INVALID);
  CHECK_STATUS(fo_optimizer_set_param_option(opt, "a", "lr", NAN), INVALID);
  CHECK_STATUS(fo_optimizer_get_option(opt, "lr", &v), OK);
  CHECK(v == 0.1); /* the default is untouched by the override */
  for (int round = 0; round < 2; ++round) {
    fill(ga, 8), fill(gb, 8), memcpy(a0, a, sizeof a), memcpy(b0, b, sizeof b);
    CHECK_STATUS(step2(opt, ga, gb), OK);
    CHECK(sgd_mismatches(a, a0, ga, (float)0.1, 8) == 0);
    CHECK(sgd_mismatches(b, b0, gb, (float)0.5, 8) == 0);
  }
  fo_optimizer_destroy(opt);
}

static void test_state_sparse_checkpoint(void) {
  float p[64], g[64], out[64];
  const int64_t idx[1] = {0};
  fill(p, 64), fill(g, 64);
  fo_optimizer* opt = make("adam", -1);
  CHECK_STATUS(add1(opt, "w", p, 64), OK);
  const void* grads[1] = {g};
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  snapshot s1, s2;
  snap_take(&s1, opt, "w", p, 64, "exp_avg");
  snap_take(&s2, opt, "w", p, 64, "exp_avg_sq");
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "nope", out, 64), INVALID);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "max_exp_avg_sq", out, 64), INVALID);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "exp_avg", out, 63), INVALID);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "exp_avg", NULL, 64), INVALID);
  CHECK_STATUS(fo_optimizer_get_state(opt, "v", "exp_avg", out, 64), INVALID);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", NULL, out, 64), INVALID);
  CHECK(snap_same(&s1) && snap_same(&s2));

  /* Sparse steps are not available on adam (yet). */
  CHECK_STATUS2(fo_optimizer_step_sparse(opt, "w", idx, FO_INT64, 1, g, NULL), FO_UNSUPPORTED,
                INVALID);
  CHECK(snap_same(&s1) && snap_same(&s2));

  /* Checkpoints may be unsupported, but a valid path is never an invalid argument. */
  const char* path = "/tmp/fusedopt_c_api_test.ckpt";
  fo_status st = fo_optimizer_save(opt, path);
  CHECK(st != INVALID);
  if (st != OK) CHECK(fo_last_error()[0] != '\0');
  CHECK(snap_same(&s1) && snap_same(&s2));
  if (st == OK) { /* then load must restore the step count and the state */
    CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
    CHECK_STATUS(fo_optimizer_load(opt, path), OK);
    CHECK(steps_of(opt, "w") == 1);
    CHECK_STATUS(fo_optimizer_get_state(opt, "w", "exp_avg", out, 64), OK);
    CHECK(memcmp(out, s1.state_copy, sizeof out) == 0);
  } else {
    st = fo_optimizer_load(opt, path);
    CHECK(st != INVALID && st != OK);
    CHECK(fo_last_error()[0] != '\0');
    CHECK(snap_same(&s1) && snap_same(&s2));
  }
  remove(path);
  fo_optimizer_destroy(opt);
}

/* Row-wise AdaGrad through the ABI: a [rows] state sized by fo_optimizer_state_numel, sparse
 * steps only, and the state a caller sized by the element count is refused. */
static void test_rowwise_state_numel(void) {
  enum { ROWS = 12, DIM = 5 };
  float table[ROWS * DIM], g[2 * DIM], sum[ROWS], wrong[ROWS * DIM];
  const int64_t shape[2] = {ROWS, DIM};
  const int64_t idx[2] = {7, 2};
  int64_t n = -1;
  fill(table, ROWS * DIM);
  fill(g, 2 * DIM);
  fo_optimizer* opt = make("adagrad", 0.1);
  CHECK_STATUS(fo_optimizer_set_option(opt, "rowwise", 1), OK);
  CHECK_STATUS(fo_optimizer_add_param(opt, "emb", table, FO_FLOAT32, 2, shape), OK);
  CHECK_STATUS(fo_optimizer_state_numel(opt, "emb", "sum", &n), OK);
  CHECK(n == ROWS);
  CHECK_STATUS(fo_optimizer_state_numel(opt, "emb", "nope", &n), INVALID);
  CHECK_STATUS(fo_optimizer_state_numel(opt, "emb", "sum", NULL), INVALID);
  CHECK_STATUS(fo_optimizer_step_sparse(opt, "emb", idx, FO_INT64, 2, g, NULL), OK);
  CHECK_STATUS(fo_optimizer_get_state(opt, "emb", "sum", sum, ROWS), OK);
  CHECK(sum[7] > 0.0f && sum[2] > 0.0f && sum[0] == 0.0f && sum[11] == 0.0f);
  CHECK_STATUS(fo_optimizer_get_state(opt, "emb", "sum", wrong, ROWS * DIM), INVALID);
  const void* grads[1] = {g};
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), FO_UNSUPPORTED);
  CHECK(steps_of(opt, "emb") == 1);
  fo_optimizer_destroy(opt);
  CHECK(fo_abi_version() >= 4);
}

/* The weight EMA through the ABI: ema_decay, the "ema" state, swap twice and copy. */
static void test_weight_ema(void) {
  enum { N = 9 };
  float w[N], w0[N], g[N], ema[N], ema_before[N];
  const int64_t shape[1] = {N};
  double decay = 0.0;
  fill(w, N);
  memcpy(w0, w, sizeof w);
  fo_optimizer* opt = make("adam", 0.1);
  CHECK_STATUS(fo_optimizer_add_param(opt, "w", w, FO_FLOAT32, 1, shape), OK);
  CHECK_STATUS(fo_optimizer_swap_ema(opt, NULL), INVALID); /* no EMA yet */
  CHECK_STATUS(fo_optimizer_set_option(opt, "ema_decay", 1.0), INVALID);
  CHECK_STATUS(fo_optimizer_set_option(opt, "ema_decay", 0.75), OK);
  CHECK_STATUS(fo_optimizer_get_option(opt, "ema_decay", &decay), OK);
  CHECK(decay == 0.75);
  fill(g, N);
  const void* grads[1] = {g};
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "ema", ema, N), OK);
  /* One step from a copy of the param: ema = w0 + 0.25 * (w - w0), near enough. */
  int near = 1;
  for (int i = 0; i < N; ++i)
    near &= fabsf(ema[i] - (w0[i] + 0.25f * (w[i] - w0[i]))) <= 1e-6f * (1 + fabsf(w0[i]));
  CHECK(near);
  memcpy(ema_before, ema, sizeof ema);
  memcpy(w0, w, sizeof w);
  CHECK_STATUS(fo_optimizer_swap_ema(opt, NULL), OK);
  CHECK(memcmp(w, ema_before, sizeof w) == 0);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "ema", ema, N), OK);
  CHECK(memcmp(ema, w0, sizeof ema) == 0);
  CHECK_STATUS(fo_optimizer_swap_ema(opt, NULL), OK);
  CHECK(memcmp(w, w0, sizeof w) == 0);
  CHECK_STATUS(fo_optimizer_copy_ema_to_params(opt, NULL), OK);
  CHECK(memcmp(w, ema_before, sizeof w) == 0);
  CHECK_STATUS(fo_optimizer_copy_ema_to_params(NULL, NULL), INVALID);
  CHECK_STATUS(fo_optimizer_set_option(opt, "ema_decay", 0.0), INVALID); /* it has stepped */
  fo_optimizer_destroy(opt);
  CHECK(fo_abi_version() >= 5);
}

/* Schedule-Free's two forms: eval() then train() gives the params back bitwise; a step in
 * eval mode is refused; other algorithms have one form. */
static void test_schedule_free_eval(void) {
  enum { N = 11 };
  float w[N], y[N], g[N];
  const int64_t shape[1] = {N};
  fill(w, N);
  fo_optimizer* opt = make("adamw_schedule_free", 0.01);
  CHECK_STATUS(fo_optimizer_add_param(opt, "w", w, FO_FLOAT32, 1, shape), OK);
  const void* grads[1] = {g};
  for (int t = 0; t < 3; ++t) {
    fill(g, N);
    CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  }
  memcpy(y, w, sizeof w);
  CHECK_STATUS(fo_optimizer_eval(opt, NULL), OK);
  CHECK(memcmp(w, y, sizeof w) != 0); /* x, not y */
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), INVALID);
  CHECK_STATUS(fo_optimizer_train(opt, NULL), OK);
  CHECK(memcmp(w, y, sizeof w) == 0);
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK_STATUS(fo_optimizer_eval(NULL, NULL), INVALID);
  fo_optimizer_destroy(opt);
  fo_optimizer* adam = make("adam", 0.1);
  CHECK_STATUS(fo_optimizer_eval(adam, NULL), FO_UNSUPPORTED);
  fo_optimizer_destroy(adam);
  CHECK(fo_abi_version() >= 6);
}

/* adafactor: factored states by the param's shape, through the C ABI by name. */
static void test_factored_states(void) {
  enum { B = 2, ROWS = 3, COLS = 7 };
  float w[B * ROWS * COLS], v[9], gw[B * ROWS * COLS], gv[9], row[B * ROWS], col[B * COLS];
  const int64_t shape[3] = {B, ROWS, COLS};
  int64_t n = -1;
  fill(w, B * ROWS * COLS);
  fill(v, 9);
  fill(gw, B * ROWS * COLS);
  fill(gv, 9);
  fo_optimizer* opt = make("adafactor", 0.01);
  CHECK_STATUS(fo_optimizer_add_param(opt, "w", w, FO_FLOAT32, 3, shape), OK);
  CHECK_STATUS(add1(opt, "v", v, 9), OK);
  CHECK_STATUS(fo_optimizer_state_numel(opt, "w", "row_var", &n), OK);
  CHECK(n == B * ROWS);
  CHECK_STATUS(fo_optimizer_state_numel(opt, "w", "col_var", &n), OK);
  CHECK(n == B * COLS);
  CHECK_STATUS(fo_optimizer_state_numel(opt, "w", "variance", &n), INVALID); /* a vector's */
  CHECK_STATUS(fo_optimizer_state_numel(opt, "v", "variance", &n), OK);
  CHECK(n == 9);
  CHECK_STATUS(fo_optimizer_state_numel(opt, "v", "row_var", &n), INVALID);
  CHECK_STATUS(fo_optimizer_set_option(opt, "d", 0.5), INVALID); /* d >= 1 */
  CHECK_STATUS(step2(opt, gw, gv), OK);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "row_var", row, B * ROWS), OK);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "col_var", col, B * COLS), OK);
  /* Step 1 blends with weight 1: each statistic is its row's / column's mean of g^2. */
  double want_row = 0.0, want_col = 0.0;
  for (int c = 0; c < COLS; ++c) want_row += (double)gw[c] * gw[c];
  for (int r = 0; r < ROWS; ++r) want_col += (double)gw[r * COLS] * gw[r * COLS];
  CHECK(fabs(row[0] - want_row / COLS) <= 1e-6 * want_row / COLS);
  CHECK(fabs(col[0] - want_col / ROWS) <= 1e-6 * want_col / ROWS);
  fo_optimizer_destroy(opt);
}

/* muon by name: matrices only (a vector is refused, nothing added), its state, ns_bf16 refused
 * by a CPU step with nothing changed. */
static void test_muon(void) {
  enum { R = 6, C = 4 };
  float w[R * C], g[R * C], before[R * C], buf[R * C], v[R];
  fill(w, R * C);
  fill(v, R);
  const int64_t shape[2] = {R, C}, vec[1] = {R};
  fo_optimizer* opt = make("muon", 0.02);
  CHECK_STATUS(fo_optimizer_add_param(opt, "b", v, FO_FLOAT32, 1, vec), INVALID);
  CHECK_STATUS(fo_optimizer_add_param(opt, "w", w, FO_FLOAT32, 2, shape), OK);
  const void* grads[1] = {g};
  fill(g, R * C);
  memcpy(before, w, sizeof w);
  CHECK_STATUS(fo_optimizer_set_option(opt, "ns_bf16", 1), OK);
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), FO_UNSUPPORTED);
  CHECK(memcmp(w, before, sizeof w) == 0);
  CHECK(steps_of(opt, "w") == 0);
  CHECK_STATUS(fo_optimizer_set_option(opt, "ns_bf16", 0), OK);
  CHECK_STATUS(fo_optimizer_set_option(opt, "adjust_lr_fn", 3), INVALID);
  CHECK_STATUS(fo_optimizer_step(opt, grads, NULL), OK);
  CHECK(memcmp(w, before, sizeof w) != 0);
  CHECK(steps_of(opt, "w") == 1);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "momentum_buffer", buf, R * C), OK);
  int ok = 1; /* buf = lerp(0, g, 1 - 0.95) = 0.05 g (to a float rounding) */
  for (int i = 0; i < R * C; ++i) ok = ok && fabsf(buf[i] - 0.05f * g[i]) <= 1e-6f * fabsf(g[i]);
  CHECK(ok);
  fo_optimizer_destroy(opt);
}

/* Muon with AdamW in one optimizer: the vector by adamw (fo_optimizer_add_param_with), its
 * defaults as "adamw.lr"; one step moves both, each with its own state. */
static void test_mixed_algorithms(void) {
  enum { R = 6, C = 4 };
  float w[R * C], g[R * C], v[R], gv[R], v0[R], m[R];
  const int64_t shape[2] = {R, C}, vec[1] = {R};
  const char* algorithm = NULL;
  double lr = 0.0;
  fill(w, R * C);
  fill(v, R);
  fill(g, R * C);
  fill(gv, R);
  memcpy(v0, v, sizeof v);
  fo_optimizer* opt = make("muon", 0.02);
  CHECK_STATUS(fo_optimizer_set_option(opt, "adamw.lr", 0.001), OK);
  CHECK_STATUS(fo_optimizer_set_option(opt, "nosuch.lr", 0.001), INVALID);
  CHECK_STATUS(fo_optimizer_get_option(opt, "adamw.lr", &lr), OK);
  CHECK(lr == 0.001);
  CHECK_STATUS(fo_optimizer_add_param_with(opt, "w", NULL, w, FO_FLOAT32, 2, shape), OK);
  CHECK_STATUS(fo_optimizer_add_param_with(opt, "v", "nosuch", v, FO_FLOAT32, 1, vec), INVALID);
  CHECK_STATUS(fo_optimizer_add_param_with(opt, "v", "adamw", v, FO_FLOAT32, 1, vec), OK);
  CHECK_STATUS(fo_optimizer_param_algorithm(opt, "v", &algorithm), OK);
  CHECK(algorithm && strcmp(algorithm, "adamw") == 0);
  CHECK_STATUS(fo_optimizer_param_algorithm(opt, "w", &algorithm), OK);
  CHECK(algorithm && strcmp(algorithm, "muon") == 0);
  CHECK_STATUS(fo_optimizer_param_algorithm(opt, "x", &algorithm), INVALID);
  CHECK_STATUS(step2(opt, g, gv), OK);
  CHECK(steps_of(opt, "v") == 1);
  /* AdamW's first step: v0 (1 - lr wd) - lr g / (|g| + eps), a move of lr (to eps / |g|). */
  int ok = 1;
  for (int i = 0; i < R; ++i)
    ok = ok && fabsf(fabsf(v[i] - v0[i] * (1.0f - 0.001f * 0.01f)) - 0.001f) <= 1e-6f;
  CHECK(ok);
  CHECK_STATUS(fo_optimizer_get_state(opt, "v", "exp_avg", m, R), OK);
  CHECK_STATUS(fo_optimizer_get_state(opt, "w", "exp_avg", m, R), INVALID); /* muon's */
  fo_optimizer_destroy(opt);
  CHECK(fo_abi_version() >= 7);
}

int main(int argc, char** argv) {
  unsigned long seed = argc > 1 ? strtoul(argv[1], NULL, 10) : (unsigned long)time(NULL);
  fprintf(stderr, "c_api_test: seed %lu (replay: c_api_test %lu)\n", seed, seed);
  g_rng = (uint64_t)seed;
  test_basics_and_create();
  test_options();
  test_sgd();
  test_null_grad();
  test_adam();
  test_add_param_errors();
  test_param_option();
  test_state_sparse_checkpoint();
  test_rowwise_state_numel();
  test_weight_ema();
  test_schedule_free_eval();
  test_factored_states();
  test_muon();
  test_mixed_algorithms();
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
