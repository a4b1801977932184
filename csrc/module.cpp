// Python module of the extension: the kernels register themselves as CUDA impls of the `qoq` ops
// (TORCH_LIBRARY_IMPL in each .cu); this file only exposes build facts for the stale-build check.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#ifndef QOQ_SOURCE_HASH
#define QOQ_SOURCE_HASH "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("source_hash", []() { return std::string(QOQ_SOURCE_HASH); },
        "Hash of the csrc/ files this extension was built from.");
  m.def("torch_version", []() {
          return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                 std::to_string(TORCH_VERSION_PATCH);
        },
        "torch version the extension was built against.");
}
