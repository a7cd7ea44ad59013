/* The smallest C user of the installed library: one SGD step through the C ABI. */
#include <fusedopt/fusedopt.h>
#include <stdio.h>

int main(void) {
  float w[3] = {1.0f, 2.0f, 3.0f};
  const float g[3] = {1.0f, 1.0f, 1.0f};
  const int64_t shape[1] = {3};
  const void* grads[1] = {g};
  fo_optimizer* opt = NULL;
  if (fo_optimizer_create("sgd", FO_DEVICE_CPU, 0, &opt) != FO_OK ||
      fo_optimizer_set_option(opt, "lr", 0.5) != FO_OK ||
      fo_optimizer_add_param(opt, "w", w, FO_FLOAT32, 1, shape) != FO_OK ||
      fo_optimizer_step(opt, grads, NULL) != FO_OK) {
    fprintf(stderr, "fusedopt: %s\n", fo_last_error());
    return 1;
  }
  fo_optimizer_destroy(opt);
  printf("c_consumer: w = %g %g %g (ABI %d)\n", w[0], w[1], w[2], fo_abi_version());
  return (w[0] == 0.5f && w[1] == 1.5f && w[2] == 2.5f) ? 0 : 1;
}
