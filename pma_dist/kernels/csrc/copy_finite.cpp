// Copy a CPU tensor into its slot and report whether every element copied is finite, in one
// pass over memory: each element's exponent bits are tested as it is copied (all ones means
// NaN or Inf), so the check reads nothing twice. Built by pma_dist/kernels/_cpu.py, which checks
// dtypes, devices, sizes and contiguity before passing raw addresses here.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>

namespace {

constexpr std::int64_t kGrain = 1 << 16;

// Out[i] = widen(In[i]) for In holding the source's raw bits; true when no element of In has
// every exponent bit set.
template <typename In, typename Out, In ExponentBits, int Shift>
bool copy_finite(std::intptr_t dst, std::intptr_t src, std::int64_t numel) {
  const In* in = reinterpret_cast<const In*>(src);
  Out* out = reinterpret_cast<Out*>(dst);
  std::atomic<bool> finite{true};
  at::parallel_for(0, numel, kGrain, [&](std::int64_t begin, std::int64_t end) {
    In nonfinite = 0;
    for (std::int64_t i = begin; i < end; ++i) {
      const In bits = in[i];
      out[i] = static_cast<Out>(bits) << Shift;
      nonfinite |= static_cast<In>((bits & ExponentBits) == ExponentBits);
    }
    if (nonfinite) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

}  // namespace

void register_delta_codes(pybind11::module_& module);  // delta_codes.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  module.def("float64", &copy_finite<std::uint64_t, std::uint64_t, 0x7FF0000000000000ull, 0>,
             release());
  module.def("float32", &copy_finite<std::uint32_t, std::uint32_t, 0x7F800000u, 0>, release());
  module.def("bfloat16", &copy_finite<std::uint16_t, std::uint16_t, 0x7F80u, 0>, release());
  module.def("float16", &copy_finite<std::uint16_t, std::uint16_t, 0x7C00u, 0>, release());
  // bfloat16 is the upper half of a float32: widening is a shift, exact.
  module.def("bfloat16_to_float32", &copy_finite<std::uint16_t, std::uint32_t, 0x7F80u, 16>,
             release());
  register_delta_codes(module);
}
