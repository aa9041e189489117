// Python bindings of the tensor pipeline's compiled parts, added to the extension's pybind11 module.
#pragma once

#include <torch/extension.h>

namespace torchspec {
namespace pipeline {

void bind(pybind11::module_& m);

}  // namespace pipeline
}  // namespace torchspec
