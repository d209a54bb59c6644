// Test driver of the CUDA emulator: runs one launcher of kernels/ (or a planted
// kernel of planted.cu) on the arrays of a case file and writes every array back.
//
//   driver CASE_IN CASE_OUT
//
// Case file (written and read by tests/cuda_emu/harness.py):
//   SAEEMU1
//   op NAME
//   int KEY VALUE          (int64)
//   float KEY VALUE        (double)
//   array NAME NBYTES OFFSET
//   <NBYTES raw bytes>
//   end
// Each array gets its own heap block of exactly OFFSET + NBYTES bytes, the data
// at OFFSET (a misaligned pointer when OFFSET is not a multiple of 16), so
// ASan reports any access past its end. Inputs an op must not write are
// compared before and after: a changed input is an error (exit 3). The output
// file holds `int cuda_error CODE` and every array.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "extra_ops.h"
#include "sparse_ops.cuh"

namespace {

using sae_fast_kernels::DType;

struct Array {
  char* base = nullptr;
  char* data = nullptr;
  size_t nbytes = 0;
  size_t offset = 0;
  std::string meta;  // "DTYPE D0 D1 ..." for arrays the op allocated (see emu_driver::Alloc)
};

struct Case {
  std::string op;
  std::map<std::string, long long> ints;
  std::map<std::string, double> floats;
  std::map<std::string, Array> arrays;
  std::vector<std::string> order;  // array names in file order

  long long i(const char* k) const {
    auto it = ints.find(k);
    if (it == ints.end()) throw std::runtime_error(std::string("missing int ") + k);
    return it->second;
  }
  double f(const char* k) const {
    auto it = floats.find(k);
    if (it == floats.end()) throw std::runtime_error(std::string("missing float ") + k);
    return it->second;
  }
  template <typename T>
  T* a(const char* k) {
    auto it = arrays.find(k);
    return it == arrays.end() ? nullptr : reinterpret_cast<T*>(it->second.data);
  }
};

Case read_case(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  Case c;
  char line[512];
  if (!std::fgets(line, sizeof line, f) || std::strcmp(line, "SAEEMU1\n") != 0)
    throw std::runtime_error("not a case file");
  while (std::fgets(line, sizeof line, f)) {
    char kind[16], key[128];
    if (std::strcmp(line, "end\n") == 0) break;
    if (std::sscanf(line, "%15s %127s", kind, key) != 2) throw std::runtime_error(std::string("bad line ") + line);
    const char* rest = line + std::strlen(kind) + 1 + std::strlen(key);
    if (!std::strcmp(kind, "op")) {
      c.op = key;
    } else if (!std::strcmp(kind, "int")) {
      c.ints[key] = std::strtoll(rest, nullptr, 10);
    } else if (!std::strcmp(kind, "float")) {
      c.floats[key] = std::strtod(rest, nullptr);
    } else if (!std::strcmp(kind, "array")) {
      Array arr;
      unsigned long long nb = 0, off = 0;
      if (std::sscanf(rest, "%llu %llu", &nb, &off) != 2) throw std::runtime_error("bad array line");
      arr.nbytes = nb;
      arr.offset = off;
      arr.base = static_cast<char*>(std::malloc(arr.offset + arr.nbytes + (arr.offset + arr.nbytes == 0)));
      arr.data = arr.base + arr.offset;
      if (arr.nbytes && std::fread(arr.data, 1, arr.nbytes, f) != arr.nbytes) throw std::runtime_error("short array");
      c.arrays[key] = arr;
      c.order.push_back(key);
    } else {
      throw std::runtime_error(std::string("bad kind ") + kind);
    }
  }
  std::fclose(f);
  return c;
}

void write_out(const char* path, const Case& c, int err) {
  FILE* f = std::fopen(path, "wb");
  if (!f) throw std::runtime_error(std::string("cannot write ") + path);
  std::fprintf(f, "SAEEMU1\nop %s\nint cuda_error %d\n", c.op.c_str(), err);
  for (const auto& name : c.order) {
    const Array& a = c.arrays.at(name);
    std::fprintf(f, "array %s %zu 0%s%s\n", name.c_str(), a.nbytes, a.meta.empty() ? "" : " ", a.meta.c_str());
    if (a.nbytes) std::fwrite(a.data, 1, a.nbytes, f);
  }
  std::fprintf(f, "end\n");
  std::fclose(f);
}

DType dt(long long code) {
  if (code < 0 || code > 2) throw std::runtime_error("dtype code must be 0, 1 or 2");
  return static_cast<DType>(code);
}

// Runs c.op; returns the launcher's cudaError_t and the arrays it may write.
int run(Case& c, std::set<std::string>& outputs) {
  const std::string& op = c.op;
  if (op == "sparse_decode") {
    outputs = {"out"};
    return sae_fast_kernels::sparse_decode(
        dt(c.i("w")), dt(c.i("out_dtype")), c.a<int64_t>("indices"), c.a<void>("values"), c.a<int32_t>("counts"),
        c.a<void>("W"), c.a<void>("bias"), c.a<void>("out"), c.i("N"), c.i("K"), c.i("S"), c.i("D"), nullptr);
  }
  if (op == "sparse_gather_dot") {
    outputs = {"out"};
    return sae_fast_kernels::sparse_gather_dot(dt(c.i("w")), dt(c.i("g")), c.a<void>("grad"), c.a<int64_t>("indices"),
                                               c.a<int32_t>("counts"), c.a<void>("W"), c.a<void>("out"), c.i("N"),
                                               c.i("K"), c.i("S"), c.i("D"), nullptr);
  }
  if (op == "sparse_scatter_rows_segmented") {
    outputs = {"out"};
    return sae_fast_kernels::sparse_scatter_rows_segmented(dt(c.i("t")), c.a<int64_t>("order"), c.a<int64_t>("start"),
                                                           c.a<void>("coef"), c.a<void>("grad"), c.a<void>("out"),
                                                           c.i("S"), c.i("N"), c.i("K"), c.i("D"), nullptr);
  }
  if (op == "adam_b1zero_rows") {
    outputs = {"param", "v", "last"};
    return sae_fast_kernels::adam_b1zero_rows(
        dt(c.i("t")), c.a<void>("param"), c.a<float>("v"), c.a<int64_t>("last"), c.a<int64_t>("rows"),
        c.a<void>("grad"), c.i("n"), c.i("n_rows"), c.i("L"), c.i("s_row"), c.i("s_col"), c.i("step"),
        static_cast<float>(c.f("lr")), static_cast<float>(c.f("beta2")), static_cast<float>(c.f("one_minus_beta2")),
        static_cast<float>(c.f("eps")), static_cast<float>(c.f("bc2_sqrt")), c.i("renorm") != 0, nullptr);
  }
  // Arrays an op allocates itself (shapes that depend on the data, as a host entry
  // allocates them after reading counts back): exact-size heap blocks, written back.
  emu_driver::Alloc alloc = [&](const char* name, size_t nbytes, const std::string& meta) -> void* {
    Array arr;
    arr.nbytes = nbytes;
    arr.base = arr.data = static_cast<char*>(std::malloc(nbytes ? nbytes : 1));
    arr.meta = meta;
    c.arrays[name] = arr;
    c.order.push_back(name);
    outputs.insert(name);
    return arr.data;
  };
  if (int err = 0;
      emu_driver::run_extra(c.op, c.ints, c.floats, [&](const char* k) { return c.a<void>(k); }, alloc, outputs, err))
    return err;
  throw std::runtime_error("unknown op " + op);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASE_IN CASE_OUT\n", argv[0]);
    return 2;
  }
  try {
    Case c = read_case(argv[1]);
    std::map<std::string, std::vector<char>> before;
    for (const auto& [name, a] : c.arrays) before[name].assign(a.data, a.data + a.nbytes);
    std::set<std::string> outputs;
    const int err = run(c, outputs);
    for (const auto& [name, a] : c.arrays) {
      if (outputs.count(name)) continue;
      if (a.nbytes && std::memcmp(before[name].data(), a.data, a.nbytes) != 0) {
        std::fprintf(stderr, "driver: op %s wrote its input array %s\n", c.op.c_str(), name.c_str());
        return 3;
      }
    }
    write_out(argv[2], c, err);
    for (auto& [name, a] : c.arrays) std::free(a.base);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "driver: %s\n", e.what());
    return 2;
  }
  return 0;
}
