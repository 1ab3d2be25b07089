// pybind11 entry points: raw pointers, sizes, strides, a dtype code and a stream handle. No libtorch
// link, so one build works with any torch. Compiled into _C (nvcc kernels, real GPUs) and _C_host
// (the same kernels on the simt fiber simulator); TK_MODULE_NAME says which.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <vector>
#include <cstdint>

#include "attention.h"
#include "cross_entropy.h"
#include "epilogue.h"
#include "norm.h"
#include "probe.h"
#include "ptx_selftest.h"
#include "rotary.h"
#include "softmax.h"

#ifdef TK_HOST_SIM
#include "host/selftest.h"
#endif

namespace py = pybind11;
using Strides = std::array<int64_t, 4>;

namespace {

// Raises RuntimeError (never crashes) when the CUDA build is called on a machine with no device.
void require_device() {
#ifndef TK_HOST_SIM
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0)
    throw std::runtime_error(std::string("no CUDA device: ") + (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices"));
#endif
}

// `python -m transformer_kernels bench --host` times the host work of a call alone: with this set, every entry
// point parses its arguments as always and then returns instead of launching.
bool g_launches_stubbed = false;

tk_stream_t as_stream(uintptr_t s) { return reinterpret_cast<tk_stream_t>(s); }
template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void softmax_forward(uintptr_t x, uintptr_t mask, uintptr_t y, int64_t rows, int64_t cols, int64_t d1, int64_t d2,
                     Strides x_stride, Strides mask_stride, float scale, bool causal, int64_t causal_offset,
                     int dtype, int mask_kind, int algo, uintptr_t stream) {
  require_device();
  tk::SoftmaxFwdArgs a{};
  a.x = ptr<const void>(x);
  a.mask = ptr<const void>(mask);
  a.y = ptr<void>(y);
  a.rows = rows, a.cols = cols, a.d1 = d1, a.d2 = d2;
  for (int i = 0; i < 4; ++i) a.x_stride[i] = x_stride[i], a.mask_stride[i] = mask_stride[i];
  a.scale = scale, a.causal = causal, a.causal_offset = causal_offset, a.dtype = dtype, a.mask_kind = mask_kind;
  if (!g_launches_stubbed) tk::softmax_forward(a, algo, as_stream(stream));
}

void softmax_backward(uintptr_t y, uintptr_t dy, uintptr_t dx, int64_t rows, int64_t cols, int64_t d1, int64_t d2,
                      Strides dy_stride, float scale, int dtype, int algo, uintptr_t stream) {
  require_device();
  tk::SoftmaxBwdArgs a{};
  a.y = ptr<const void>(y);
  a.dy = ptr<const void>(dy);
  a.dx = ptr<void>(dx);
  a.rows = rows, a.cols = cols, a.d1 = d1, a.d2 = d2;
  for (int i = 0; i < 4; ++i) a.dy_stride[i] = dy_stride[i];
  a.scale = scale, a.dtype = dtype;
  if (!g_launches_stubbed) tk::softmax_backward(a, algo, as_stream(stream));
}

// Argument blocks of the newer kernels come as dicts: reading fields by name keeps the Python and C++ sides
// from silently disagreeing on the order of twenty arguments.
// The kernels read the dropout seed from device memory whenever there is dropout.
void require_seed(float dropout_p, const uint64_t* seed) {
  if (dropout_p > 0.0f && seed == nullptr) throw std::invalid_argument("dropout_p > 0 needs a seed tensor");
}

struct Fields {
  const py::dict& d;
  template <typename T> T* p(const char* k) const { return ptr<T>(d[k].cast<uintptr_t>()); }
  int64_t i(const char* k) const { return d[k].cast<int64_t>(); }
  float f(const char* k) const { return d[k].cast<float>(); }
};

tk::NormArgs norm_args(const py::dict& d) {
  Fields f{d};
  tk::NormArgs a{};
  a.x = f.p<const void>("x"), a.residual = f.p<const void>("residual"), a.weight = f.p<const void>("weight");
  a.bias = f.p<const void>("bias"), a.y = f.p<void>("y"), a.sum = f.p<void>("sum"), a.mean = f.p<float>("mean");
  a.rstd = f.p<float>("rstd"), a.dy = f.p<const void>("dy"), a.dx = f.p<void>("dx");
  a.dw_partial = f.p<float>("dw_partial"), a.db_partial = f.p<float>("db_partial"), a.dw = f.p<void>("dw");
  a.db = f.p<void>("db");
  a.rows = f.i("rows"), a.cols = f.i("cols"), a.x_row_stride = f.i("x_row_stride");
  a.res_row_stride = f.i("res_row_stride"), a.dy_row_stride = f.i("dy_row_stride");
  a.eps = f.f("eps"), a.rms = static_cast<int>(f.i("rms")), a.dtype = static_cast<int>(f.i("dtype"));
  return a;
}

tk::EpilogueArgs epilogue_args(const py::dict& d) {
  Fields f{d};
  tk::EpilogueArgs a{};
  a.acc = f.p<void>("acc"), a.acc2 = f.p<void>("acc2"), a.bias = f.p<const void>("bias");
  a.bias2 = f.p<const void>("bias2"), a.residual = f.p<const void>("residual"), a.y = f.p<void>("y");
  a.M = f.i("M"), a.N = f.i("N"), a.res_row_stride = f.i("res_row_stride"), a.act = static_cast<int>(f.i("act"));
  a.dropout_p = f.f("dropout_p"), a.seed = f.p<const uint64_t>("seed"), a.dtype = static_cast<int>(f.i("dtype"));
  require_seed(a.dropout_p, a.seed);
  return a;
}

tk::ActBackwardArgs act_backward_args(const py::dict& d) {
  Fields f{d};
  tk::ActBackwardArgs a{};
  a.dy = f.p<const void>("dy"), a.z = f.p<const void>("z"), a.z2 = f.p<const void>("z2"), a.dz = f.p<void>("dz");
  a.dz2 = f.p<void>("dz2"), a.M = f.i("M"), a.N = f.i("N"), a.dy_row_stride = f.i("dy_row_stride");
  a.dy_col_stride = f.i("dy_col_stride"), a.act = static_cast<int>(f.i("act")), a.dropout_p = f.f("dropout_p");
  a.seed = f.p<const uint64_t>("seed"), a.dtype = static_cast<int>(f.i("dtype"));
  require_seed(a.dropout_p, a.seed);
  return a;
}

tk::HeadLayoutArgs head_layout_args(const py::dict& d) {
  Fields f{d};
  tk::HeadLayoutArgs a{};
  a.src = f.p<const void>("src"), a.bias = f.p<const void>("bias"), a.dst = f.p<void>("dst");
  a.B = f.i("B"), a.heads = f.i("heads"), a.L = f.i("L"), a.D = f.i("D"), a.col0 = f.i("col0");
  a.row_stride = f.i("row_stride"), a.dtype = static_cast<int>(f.i("dtype"));
  auto st = d["strides"].cast<std::vector<int64_t>>();
  if (st.size() != 4) throw std::invalid_argument("head layout: 4 strides expected");
  for (int k = 0; k < 4; ++k) a.strides[k] = st[k];
  return a;
}

// The attention argument block from a dict (ops fill it by name: the block has too many fields for positions).
tk::AttentionArgs attention_args(const py::dict& d) {
  auto i64 = [&](const char* k) { return d[k].cast<int64_t>(); };
  auto strides = [&](const char* k, int64_t* out, int n) {
    auto v = d[k].cast<std::vector<int64_t>>();
    if (static_cast<int>(v.size()) != n) throw std::invalid_argument(std::string(k) + ": wrong number of strides");
    for (int i = 0; i < n; ++i) out[i] = v[i];
  };
  tk::AttentionArgs a{};
  a.q = ptr<const void>(d["q"].cast<uintptr_t>());
  a.k = ptr<const void>(d["k"].cast<uintptr_t>());
  a.v = ptr<const void>(d["v"].cast<uintptr_t>());
  a.mask = ptr<const void>(d["mask"].cast<uintptr_t>());
  a.kpm = ptr<const uint8_t>(d["kpm"].cast<uintptr_t>());
  a.out = ptr<void>(d["out"].cast<uintptr_t>());
  a.row_max = ptr<float>(d["row_max"].cast<uintptr_t>());
  a.inv_l = ptr<float>(d["inv_l"].cast<uintptr_t>());
  a.dout = ptr<const void>(d["dout"].cast<uintptr_t>());
  a.delta = ptr<float>(d["delta"].cast<uintptr_t>());
  a.dq = ptr<void>(d["dq"].cast<uintptr_t>());
  a.dk = ptr<void>(d["dk"].cast<uintptr_t>());
  a.dv = ptr<void>(d["dv"].cast<uintptr_t>());
  a.dmask = ptr<float>(d["dmask"].cast<uintptr_t>());
  a.splits = i64("splits"), a.split_len = i64("split_len");
  a.o_part = ptr<float>(d["o_part"].cast<uintptr_t>());
  a.m_part = ptr<float>(d["m_part"].cast<uintptr_t>());
  a.l_part = ptr<float>(d["l_part"].cast<uintptr_t>());
  strides("q_stride", a.q_stride, 4);
  strides("k_stride", a.k_stride, 4);
  strides("v_stride", a.v_stride, 4);
  strides("do_stride", a.do_stride, 4);
  strides("mask_stride", a.mask_stride, 4);
  strides("kpm_stride", a.kpm_stride, 2);
  a.B = i64("B"), a.H = i64("H"), a.Hkv = i64("Hkv"), a.Lq = i64("Lq"), a.Lk = i64("Lk"), a.D = i64("D");
  a.scale = d["scale"].cast<float>();
  a.causal = d["causal"].cast<bool>();
  a.causal_offset = i64("causal_offset");
  a.window_left = d.contains("window_left") ? i64("window_left") : 0;
  a.window_right = d.contains("window_right") ? i64("window_right") : 0;
  a.dropout_p = d["dropout_p"].cast<float>();
  a.seed = ptr<const uint64_t>(d["seed"].cast<uintptr_t>());
  a.dtype = d["dtype"].cast<int>();
  a.mask_kind = d["mask_kind"].cast<int>();
  a.cu_q = ptr<const int32_t>(d["cu_q"].cast<uintptr_t>());
  a.cu_k = ptr<const int32_t>(d["cu_k"].cast<uintptr_t>());
  a.total_q = i64("total_q"), a.total_k = i64("total_k");
  a.softcap = d.contains("softcap") ? d["softcap"].cast<float>() : 0.0f;
  a.alibi = ptr<const float>(d["alibi"].cast<uintptr_t>());
  strides("alibi_stride", a.alibi_stride, 2);
  a.smem_per_sm = d.contains("smem_per_sm") ? i64("smem_per_sm") : 0;
  if ((a.cu_q == nullptr) != (a.cu_k == nullptr)) throw std::invalid_argument("attention: cu_q and cu_k go together");
  if (a.Hkv <= 0 || a.H % a.Hkv != 0) throw std::invalid_argument("attention: H must be a multiple of Hkv >= 1");
  require_seed(a.dropout_p, a.seed);
  return a;
}

tk::RotaryArgs rotary_args(const py::dict& d) {
  Fields f{d};
  tk::RotaryArgs a{};
  a.q = f.p<const void>("q"), a.k = f.p<const void>("k"), a.q_out = f.p<void>("q_out"), a.k_out = f.p<void>("k_out");
  a.cos = f.p<const void>("cos"), a.sin = f.p<const void>("sin"), a.pos = f.p<const int64_t>("pos");
  a.B = f.i("B"), a.L = f.i("L"), a.Hq = f.i("Hq"), a.Hk = f.i("Hk"), a.half = f.i("half"), a.n_pass = f.i("n_pass");
  a.n_positions = f.i("n_positions"), a.step = f.i("step"), a.pair = f.i("pair");
  const char* names[4] = {"q_strides", "k_strides", "q_out_strides", "k_out_strides"};
  int64_t* dst[4] = {a.q_stride, a.k_stride, a.qo_stride, a.ko_stride};
  for (int t = 0; t < 4; ++t) {
    auto st = d[names[t]].cast<std::vector<int64_t>>();
    if (st.size() != 3) throw std::invalid_argument("rotary: 3 strides (b, h, l) expected per tensor");
    for (int k = 0; k < 3; ++k) dst[t][k] = st[k];
  }
  a.cos_b = f.i("cos_b"), a.cos_l = f.i("cos_l"), a.pos_b = f.i("pos_b"), a.pos_l = f.i("pos_l");
  a.backward = static_cast<int>(f.i("backward")), a.dtype = static_cast<int>(f.i("dtype"));
  a.cos_dtype = static_cast<int>(f.i("cos_dtype"));
  return a;
}

tk::CrossEntropyArgs cross_entropy_args(const py::dict& d) {
  Fields f{d};
  tk::CrossEntropyArgs a{};
  a.logits = f.p<void>("logits"), a.target = f.p<const int64_t>("target"), a.scale = f.p<const float>("scale");
  a.loss = f.p<float>("loss"), a.lse = f.p<float>("lse"), a.rows = f.i("rows"), a.cols = f.i("cols");
  a.row_stride = f.i("row_stride"), a.scale_stride = f.i("scale_stride"), a.ignore_index = f.i("ignore_index");
  a.label_smoothing = f.f("label_smoothing"), a.softcap = f.f("softcap"), a.z_loss = f.f("z_loss");
  a.dtype = static_cast<int>(f.i("dtype"));
  return a;
}

// Binds `name(dict, stream)`: the dict parsed into the kernel's argument block, then its launcher.
template <typename Args>
void def_launcher(py::module_& m, const char* name, Args (*parse)(const py::dict&),
                  void (*launcher)(const Args&, tk_stream_t)) {
  m.def(name, [parse, launcher](const py::dict& d, uintptr_t stream) {
    require_device();
    const Args args = parse(d);
    if (!g_launches_stubbed) launcher(args, as_stream(stream));
  });
}

}  // namespace

PYBIND11_MODULE(TK_MODULE_NAME, m) {
  m.doc() = "transformer-kernels CUDA C++ kernels (raw-pointer bindings)";
#ifdef TK_HOST_SIM
  m.attr("simulated") = true;
#else
  m.attr("simulated") = false;
#endif
  m.def("softmax_forward", &softmax_forward);
  m.def("softmax_backward", &softmax_backward);
  def_launcher(m, "attention_forward", &attention_args, &tk::attention_forward);
  def_launcher(m, "attention_backward", &attention_args, &tk::attention_backward);
  def_launcher(m, "norm_forward", &norm_args, &tk::norm_forward);
  def_launcher(m, "norm_backward", &norm_args, &tk::norm_backward);
  m.def("norm_backward_chunks", &tk::norm_backward_chunks);
  def_launcher(m, "epilogue_forward", &epilogue_args, &tk::epilogue_forward);
  def_launcher(m, "activation_backward", &act_backward_args, &tk::activation_backward);
  def_launcher(m, "head_split", &head_layout_args, &tk::head_split);
  def_launcher(m, "head_merge", &head_layout_args, &tk::head_merge);
  // Elements per global access a launcher would use for these arguments (tests ask which kernel form a call takes).
  m.def("epilogue_pack_width", [](const py::dict& d) { return tk::pack_width(epilogue_args(d)); });
  m.def("activation_backward_pack_width", [](const py::dict& d) { return tk::pack_width(act_backward_args(d)); });
  m.def("head_layout_pack_width", [](const py::dict& d, bool merge) { return tk::pack_width(head_layout_args(d), merge); });
  m.def("norm_plan", [](const py::dict& d, bool backward) {
    const tk::NormPlan p = tk::norm_plan(norm_args(d), backward);
    return py::make_tuple(p.packs_per_thread, p.threads, p.row_chunks);
  }, "(16-byte packs a thread (0: the general kernel), threads a block, backward row chunks)");
  def_launcher(m, "rotary", &rotary_args, &tk::rotary);
  def_launcher(m, "cross_entropy_rows", &cross_entropy_args, &tk::cross_entropy_rows);
  // The enums of types.h and softmax.h, so Python reads the codes instead of restating them.
  m.attr("dtype_codes") = py::dict(py::arg("float32") = static_cast<int>(tk::kFloat32),
                                   py::arg("float16") = static_cast<int>(tk::kFloat16),
                                   py::arg("bfloat16") = static_cast<int>(tk::kBFloat16));
  m.attr("mask_kinds") = py::dict(py::arg("none") = static_cast<int>(tk::kNoMask),
                                  py::arg("bool") = static_cast<int>(tk::kBoolMask),
                                  py::arg("same_dtype") = static_cast<int>(tk::kSameDTypeMask),
                                  py::arg("float32") = static_cast<int>(tk::kFloat32Mask));
  m.attr("softmax_algos") = py::dict(py::arg("auto") = static_cast<int>(tk::kAlgoAuto),
                                     py::arg("warp") = static_cast<int>(tk::kAlgoWarp),
                                     py::arg("block") = static_cast<int>(tk::kAlgoBlock));
  m.attr("activation_codes") = py::dict(py::arg("") = static_cast<int>(tk::kActNone),
                                        py::arg("relu") = static_cast<int>(tk::kActRelu),
                                        py::arg("gelu") = static_cast<int>(tk::kActGelu),
                                        py::arg("gelu_tanh") = static_cast<int>(tk::kActGeluTanh),
                                        py::arg("silu") = static_cast<int>(tk::kActSilu));
  m.def("attention_forward_tile", [](int dtype, int64_t d, int64_t smem_per_sm) {
    int bm = 0, bn = 0;
    tk::attention_forward_tile(dtype, d, smem_per_sm, &bm, &bn);
    return py::make_tuple(bm, bn);
  }, "the attention forward's (BM, BN) for a dtype code, head dim and shared memory per SM (0: unknown)");
  m.def("attention_forward_narrow", &tk::attention_forward_narrow,
        "whether the fp16/bf16 forward takes its narrow key tile for a dtype code, head dim and shared memory per SM");
  m.def("attention_backward_narrow", &tk::attention_backward_narrow,
        "whether the fp16/bf16 backward takes its narrow tiles for a dtype code, head dim and shared memory per SM");
  m.def("attention_forward_plain", [](const py::dict& d) { return tk::attention_forward_plain(attention_args(d)); },
        "whether the attention forward runs its PLAIN form for an argument block (csrc/attention_fwd.cu)");
  m.def("attention_smem", [](const std::string& pass, int dtype, int64_t d, bool narrow) {
    return pass == "fwd" ? tk::attention_forward_smem(dtype, d, narrow)
                         : tk::attention_backward_smem(dtype, d, pass == "dq", narrow);
  }, "dynamic shared memory (bytes) of the attention kernel of a pass (fwd | dkdv | dq) for a dtype code and head dim "
     "(its narrow tile with narrow)", py::arg("pass"), py::arg("dtype"), py::arg("d"),
     py::arg("narrow") = false);
  py::tuple head_dims(std::size(tk::kAttnHeadDims));
  for (std::size_t i = 0; i < std::size(tk::kAttnHeadDims); ++i) head_dims[i] = tk::kAttnHeadDims[i];
  m.attr("attention_head_dims") = head_dims;
  m.attr("attention_max_head_dim") = py::dict(py::arg("half") = tk::kAttnMaxHeadDim, py::arg("float") = tk::kAttnMaxHeadDim);
  // The instruction layout self-tests (ptx_selftest.cu): the simulator's instructions here, the GPU's in _C.
  auto ptx = m.def_submodule("ptx_selftest", "mma.sync, ldmatrix and cp.async against the PTX ISA's layouts");
  ptx.def("mma_16816", [](uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype) {
    require_device();
    tk::ptx_selftest_mma_16816(a, b, c, d, dtype);
  });
  ptx.def("ldmatrix", [](uintptr_t tile, uintptr_t out, bool trans) {
    require_device();
    tk::ptx_selftest_ldmatrix(tile, out, trans);
  });
  ptx.def("cp_async", [](uintptr_t src, uintptr_t src_bytes, uintptr_t out, int n, int threads, int wait) {
    require_device();
    tk::ptx_selftest_cp_async(src, src_bytes, out, n, threads, wait);
  });
  m.def("stub_launches", [](bool on) { g_launches_stubbed = on; },
        "every launching entry point parses its arguments, then returns without launching (host-time benchmark)");
  m.def("probe", [] {
    require_device();
    return tk::probe_launch();
  }, "\"\" when a test kernel runs on the current device, else why not");
  m.def("device_count", [] {
    require_device();
#ifdef TK_HOST_SIM
    return 0;
#else
    int n = 0;
    cudaGetDeviceCount(&n);
    return n;
#endif
  });
#ifdef TK_HOST_SIM
  m.def("simt_seed", &simt_selftest::seed, "seeds the fiber scheduling order");
  auto st = m.def_submodule("selftest", "kernels that test the simulator");
  st.def("reverse_static", &simt_selftest::reverse_static);
  st.def("reverse_dynamic", &simt_selftest::reverse_dynamic);
  st.def("read_unwritten_shared", &simt_selftest::read_unwritten_shared);
  st.def("exit_before_barrier", &simt_selftest::exit_before_barrier);
  st.def("different_barriers", &simt_selftest::different_barriers);
  st.def("shuffles", &simt_selftest::shuffles);
  st.def("int_shuffles", &simt_selftest::int_shuffles);
  st.def("atomics", &simt_selftest::atomics);
  st.def("gemm", &simt_selftest::gemm);
#endif
}
