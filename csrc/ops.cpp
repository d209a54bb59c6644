// sae_fast._C: every op schema of the extension, and the Python module.
//
// The schemas live here and only here (one TORCH_LIBRARY); the kernels register
// per device: csrc/cpu/ (TORCH_LIBRARY_IMPL(sae_fast, CPU, ...), OpenMP, always
// built) and csrc/cuda/ (TORCH_LIBRARY_IMPL(sae_fast, CUDA, ...), host entries
// over the torch-free device code of kernels/, built only with CUDA). Both
// devices reject the same inputs with the same messages (csrc/checks.h).
//
// Three sparse primitives over a SparseActs-style layout (indices int64 [N, K],
// per-row counts int32 [N], padding slots ignored):
//
//   sparse_decode(indices, values, counts, W[S, D], bias?, out_dtype?) -> out[N, D]
//       out[b] = sum_{k < counts[b]} values[b, k] * W[indices[b, k]] (+ bias), fp32 accumulation,
//       returned in W's dtype or, with out_dtype=float32, unrounded
//   sparse_gather_dot(grad[N, D], indices, counts, W[S, D]) -> [N, K] in grad's dtype
//       r[b, k] = <grad[b], W[indices[b, k]]> on valid slots, 0 on padding
//       (grad has W's dtype, or float32 for unrounded results)
//   sparse_scatter_rows(coef[N, K], indices, counts, grad[N, D], d_sae) -> [S, D]
//       G[j] = sum_{(b, k): indices[b, k] = j} coef[b, k] * grad[b], summed in a fixed
//       order on every device (deterministic)
//
// the fused optimizer step (sae_fast.reference.adam_b1zero_rows_ is its definition):
//
//   adam_b1zero_rows_(param!, v!, last!, rows?, grad, step, lr, beta2, eps, sparse_dim?, renorm)
//       Adam(beta1 = 0) on the touched rows only, with the lazy beta2^k decay of the
//       steps a row sat out, and optional unit-norm renormalisation of each row
//
// and the selection step of the dense-GEMM encoder, fused:
//
//   jumprelu_select(pre, threshold, half_bandwidth, band=True, col_offset=0)
//       -> (a_idx, a_val, a_cnt, band_idx, band_cnt, steps)
//
//   pre [N, C] (float32/bfloat16/float16, contiguous) is one chunk of features of
//   pre = x @ W_enc + b_enc, threshold [C] float32 its thresholds. One read of pre
//   gives, per row b (p = float32(pre[b, j]), t = threshold[j]):
//
//     active set A  = { j : (p > t and p > 0) or p is NaN }   a_idx int64, a_val pre's dtype, a_cnt int32
//     band N        = { j : |p - t| < float32(half_bandwidth) } band_idx int64, band_cnt int32 (band=False: empty)
//     steps[b]      = |{ j : p > t }|                          int64
//
//   the sets laid out like sae_fast.sparse.compact: [N, capacity = the largest row
//   count], entries in increasing feature order, padding index 0 and value 0;
//   an index is col_offset + j, so a chunk starting at feature col_offset gives
//   global feature ids. The definition is the mask arithmetic of
//   sae_fast.step.encoders.chunked_pre_encoder's PyTorch path, bit for bit.
//
// The decoder backward is gather_dot (dvalues) + scatter_rows (dW_dec); the
// encoder backward reuses them with x and W_encᵀ (dW_enc, dx).
// Index arithmetic is int64 throughout: N * D and S * D exceed 2^31 at 2^20 latents.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sae_fast, m) {
  m.def(
      "sparse_decode(Tensor indices, Tensor values, Tensor counts, Tensor W, Tensor? bias, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def("sparse_gather_dot(Tensor grad, Tensor indices, Tensor counts, Tensor W) -> Tensor");
  m.def("sparse_scatter_rows(Tensor coef, Tensor indices, Tensor counts, Tensor grad, int d_sae) -> Tensor");
  m.def(
      "adam_b1zero_rows_(Tensor(a!) param, Tensor(b!) v, Tensor(c!) last, Tensor? rows, Tensor grad, int step, "
      "float lr, float beta2, float eps, int? sparse_dim, bool renorm) -> ()");
  m.def(
      "jumprelu_select(Tensor pre, Tensor threshold, float half_bandwidth, bool band=True, int col_offset=0) -> "
      "(Tensor a_idx, Tensor a_val, Tensor a_cnt, Tensor band_idx, Tensor band_cnt, Tensor steps)");
}

// A minimal Python module so `import sae_fast._C` loads the library (which
// registers the ops above and the kernels of csrc/cpu and csrc/cuda); pybind11
// is not needed for that.
static PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef SAE_FAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {{"has_cuda", has_cuda, METH_NOARGS, "True when this build carries the CUDA kernels."},
                                {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sae_fast compiled ops", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
