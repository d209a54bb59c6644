// Ops of the emulator's test driver beyond sparse_ops.cuh: the fused selection
// kernel and the planted kernels of planted.cu (see driver.cpp).
#pragma once

#include <functional>
#include <map>
#include <set>
#include <string>

namespace emu_driver {

using Ints = std::map<std::string, long long>;
using Floats = std::map<std::string, double>;
using ArrayOf = std::function<void*(const char*)>;  // nullptr where the case has no such array
// Allocates an output array of the op: (name, bytes, "DTYPE D0 D1 ...") -> data.
using Alloc = std::function<void*(const char*, size_t, const std::string&)>;

// Runs `op` if it is one of these; sets the arrays it may write and its cudaError_t.
bool run_extra(const std::string& op, const Ints& ints, const Floats& floats, const ArrayOf& array, const Alloc& alloc,
               std::set<std::string>& outputs, int& err);

// The fused selection launcher (kernels/jumprelu_select.cuh), in select_ops.cpp.
bool run_extra_select(const std::string& op, const Ints& ints, const Floats& floats, const ArrayOf& array,
                      const Alloc& alloc, int& err);

}  // namespace emu_driver
