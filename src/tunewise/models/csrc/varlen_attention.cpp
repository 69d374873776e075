// Causal attention within each example of a packed row, on CPU, for training: forward and backward.
//
// Why this exists: torch's CPU flash-attention kernel ran at ~50-60 GFLOP/s on rows of 50-500 tokens with
// 64-wide heads, a sixth of a Zen 4's bf16 matmul peak, and its backward was 20% of a bf16 training step
// (docs/performance.md). Rows this short fit in cache whole, so no online softmax is needed: each block of 64
// query rows takes its full causal row of scores at once. All products run in torch's exported batch-reduce
// GEMM (`cpublas::brgemm`, oneDNN's JIT kernels: bf16 x bf16 -> fp32 in hardware where the CPU has it), with
// the sequence dimensions rounded up to multiples of 64 so that a few kernel shapes recur; the softmax and its
// gradient are plain loops the compiler vectorises. Only the causal lower triangle is computed (64 x 64 blocks).
//
// Layouts: q (1, H, T, D), k and v (1, KV, T, D), any strides with a contiguous last dimension; grouped-query
// attention maps query head h to key/value head h / (H / KV). `bounds` are the examples' [start, end) offsets
// along T. The forward returns the output in (1, T, H, D) memory and the fp32 log-sum-exp (1, H, T); the
// backward returns contiguous dq, dk, dv.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace {

using at::BFloat16;
constexpr int64_t kBlock = 64;  // rows and columns per block; also what every GEMM dimension is rounded to

int64_t round_up(int64_t x) { return (x + kBlock - 1) / kBlock * kBlock; }

// bf16 GEMMs take B in VNNI layout: pairs of rows interleaved, element (k, n) at ((k / 2) * ld + n) * 2 + k % 2.
// fp32 ones take it plain, row-major.
template <typename T> constexpr bool kVnni = std::is_same_v<T, BFloat16>;

// C (m x n, row stride ldc) = A (m x k, row stride lda) B (k x n in the layout above, row length ldb) [+ C].
template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
                 int64_t ldc, bool add) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, kVnni<T>);
}

// Round to nearest even, NaN kept NaN; branch-free so that loops of it vectorise (c10's conversion branches).
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : rounded);
}

inline uint16_t bits_of(BFloat16 x) { return x.x; }

template <typename T> inline T from_float(float x) {
  if constexpr (kVnni<T>) return BFloat16(bf16_bits(x), BFloat16::from_bits());
  else return x;
}

// e^x to ~2 ulp (Cephes' polynomial), written so that loops of it vectorise; NaN stays NaN.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// The largest of x[0, n), n >= 1. Written with intrinsics: GCC vectorises a max reduction only under
// -ffinite-math-only, which would let it assume away the NaNs we keep.
inline float row_max(const float* x, int64_t n) {
  float top = x[0];
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 lanes = _mm512_set1_ps(top);
  for (; c + 16 <= n; c += 16) lanes = _mm512_max_ps(lanes, _mm512_loadu_ps(x + c));
  top = _mm512_reduce_max_ps(lanes);
#elif defined(__AVX2__)
  __m256 lanes = _mm256_set1_ps(top);
  for (; c + 8 <= n; c += 8) lanes = _mm256_max_ps(lanes, _mm256_loadu_ps(x + c));
  float lane[8];
  _mm256_storeu_ps(lane, lanes);
  top = *std::max_element(lane, lane + 8);
#endif
  for (; c < n; c++) top = std::max(top, x[c]);
  return top;
}

// x[c] = e^(scale x[c] - shift) for c < n; returns their sum.
inline float exponentiate(float* x, int64_t n, float scale, float shift) {
  for (int64_t c = 0; c < n; c++) x[c] = exp_approx(std::fma(x[c], scale, -shift));
  float sum = 0.f;  // a loop of its own: with the exponentials in it, it did not vectorise
  for (int64_t c = 0; c < n; c++) sum += x[c];
  return sum;
}

struct Example {
  int64_t start, length, padded, offset;  // offset: sum of the earlier examples' padded lengths
};

std::vector<Example> examples_of(const std::vector<int64_t>& bounds) {
  std::vector<Example> out;
  int64_t offset = 0;
  for (size_t e = 0; e + 1 < bounds.size(); e++) {
    const int64_t length = bounds[e + 1] - bounds[e];
    TORCH_CHECK(length > 0, "cu_seq_lens must increase: example ", e, " is empty");
    out.push_back({bounds[e], length, round_up(length), offset});
    offset += round_up(length);
  }
  return out;
}

// A packed row's sizes: heads, key/value heads, tokens, head dim; the examples, padded to whole blocks, their
// total and the widest of them.
struct Row {
  int64_t heads, kv_heads, total, dim, group, padded_total, widest = 0;
  std::vector<Example> examples;
  Row(const at::Tensor& q, const at::Tensor& k, const std::vector<int64_t>& bounds)
      : heads(q.size(1)), kv_heads(k.size(1)), total(q.size(2)), dim(q.size(3)), group(heads / kv_heads),
        examples(examples_of(bounds)) {
    padded_total = examples.back().offset + examples.back().padded;
    for (const auto& ex : examples) widest = std::max(widest, ex.padded);
  }
};

// Runs body(i, scratch) for i in [0, count) on torch's threads, handing the indices out one at a time (the items
// come sorted largest first, so this balances them). Each thread keeps its scratch from call to call, grown to
// the widest example it has seen: new buffers at every call cost page faults and, held by glibc's per-thread
// heaps, peak memory.
template <typename Scratch, typename Body>
void run_items(int64_t count, int64_t width, int64_t dim, const Body& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    static thread_local Scratch scratch;
    scratch.fit(width, dim);
    for (int64_t i; (i = next.fetch_add(1)) < count;) body(i, scratch);
    at::native::cpublas::brgemm_release();  // AMX's tile state, where the CPU has it
  });
}

template <typename V> void grow(V& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
}

struct NoScratch {
  void fit(int64_t, int64_t) {}
};

struct Item {
  int64_t example, head, block, cost;
};

void sort_largest_first(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

// Rows [0, rows) of a (length, D) slice with row stride `ld`, as a kBlock x D block: the slice itself when it
// has kBlock rows, else a copy with zero rows below (so every GEMM has kBlock rows).
template <typename T> const T* block_rows(const T* src, int64_t rows, int64_t ld, int64_t dim, T* buffer) {
  if (rows == kBlock) return src;
  for (int64_t r = 0; r < kBlock; r++)
    for (int64_t d = 0; d < dim; d++) buffer[r * dim + d] = r < rows ? src[r * ld + d] : T(0);
  return buffer;
}

// src (length x dim, row stride ld) transposed, as GEMM's B (K = dim, N = pad), zero past `length`.
template <typename T> void pack_transposed(const T* src, int64_t ld, int64_t length, int64_t pad, int64_t dim, T* dst) {
  if constexpr (kVnni<T>) {  // 32-bit words: the pair (src[c][2i], src[c][2i + 1]) goes to word i * pad + c
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
    for (int64_t c = 0; c < pad; c++)
      for (int64_t i = 0; i < dim / 2; i++)
        out[i * pad + c] = c < length ? bits_of(src[c * ld + 2 * i]) | uint32_t(bits_of(src[c * ld + 2 * i + 1])) << 16 : 0u;
  } else {
    for (int64_t c = 0; c < pad; c++)
      for (int64_t d = 0; d < dim; d++) dst[d * pad + c] = c < length ? src[c * ld + d] : 0.f;
  }
}

// src (length x dim, row stride ld) as GEMM's B (K = pad, N = dim), zero rows past `length`.
template <typename T> void pack_rows(const T* src, int64_t ld, int64_t length, int64_t pad, int64_t dim, T* dst) {
  for (int64_t c = 0; c < pad; c += 2) {
    if constexpr (kVnni<T>) {
      uint32_t* out = reinterpret_cast<uint32_t*>(dst) + (c / 2) * dim;
      for (int64_t d = 0; d < dim; d++) {
        const uint32_t lo = c < length ? bits_of(src[c * ld + d]) : 0u;
        const uint32_t hi = c + 1 < length ? bits_of(src[(c + 1) * ld + d]) : 0u;
        out[d] = lo | hi << 16;
      }
    } else {
      for (int64_t r = c; r < c + 2; r++)
        for (int64_t d = 0; d < dim; d++) dst[r * dim + d] = r < length ? src[r * ld + d] : 0.f;
    }
  }
}

// src (length x dim, row stride ld) transposed into plain dst (dim x pad), zero past `length`.
template <typename T> void transpose(const T* src, int64_t ld, int64_t length, int64_t pad, int64_t dim, T* dst) {
  constexpr int64_t kTile = 32;
  for (int64_t c0 = 0; c0 < pad; c0 += kTile)
    for (int64_t d = 0; d < dim; d++)
      for (int64_t c = c0; c < c0 + kTile; c++) dst[d * pad + c] = c < length ? src[c * ld + d] : T(0);
}

// Rows `row` and `row + 1` (row even) of a pad x pad square in GEMM-B layout, from two fp32 rows of `width`.
template <typename T> void store_row_pair(const float* first, const float* second, int64_t width, int64_t row,
                                          int64_t pad, T* square) {
  if constexpr (kVnni<T>) {
    uint32_t* out = reinterpret_cast<uint32_t*>(square) + (row / 2) * pad;
    for (int64_t c = 0; c < width; c++) out[c] = bf16_bits(first[c]) | uint32_t(bf16_bits(second[c])) << 16;
  } else {
    std::copy(first, first + width, square + row * pad);
    std::copy(second, second + width, square + (row + 1) * pad);
  }
}

template <typename T> void convert_row(const float* src, int64_t n, float scale, T* dst) {
  for (int64_t i = 0; i < n; i++) dst[i] = from_float<T>(scale * src[i]);
}

// Per-thread buffers of the forward, sized for the longest example.
template <typename T> struct ForwardScratch {
  std::vector<float> s, o;
  std::vector<T> a;
  void fit(int64_t width, int64_t dim) { grow(s, kBlock * width), grow(o, kBlock * dim), grow(a, kBlock * dim); }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::vector<int64_t>& bounds, double scale) {
  const Row row(q, k, bounds);
  const auto& examples = row.examples;
  const int64_t dim = row.dim;
  const float fscale = static_cast<float>(scale);

  auto out = at::empty({1, row.total, row.heads, dim}, q.options());
  auto lse = at::empty({1, row.heads, row.total}, q.options().dtype(at::kFloat));
  auto keys = at::empty({row.kv_heads, row.padded_total * dim}, q.options());  // K^T (D x L) as GEMM's B
  // P V runs in fp32: P rounded to bf16 made the output's error 1.2-1.3x torch's flash kernel's; in fp32 it is
  // below it (tests/unit/test_kernels.py), for ~+50% on the forward's time (a quarter of the kernel's).
  auto values = at::empty({row.kv_heads, row.padded_total * dim}, q.options().dtype(at::kFloat));
  float* v_rows = values.mutable_data_ptr<float>();
  const T *qd = q.const_data_ptr<T>(), *kd = k.const_data_ptr<T>(), *vd = v.const_data_ptr<T>();
  T *pk = keys.mutable_data_ptr<T>(), *od = out.mutable_data_ptr<T>();
  float* lsed = lse.mutable_data_ptr<float>();
  auto key_t = [&](int64_t j, const Example& ex) { return pk + (j * row.padded_total + ex.offset) * dim; };

  const int64_t n_examples = examples.size();
  run_items<NoScratch>(n_examples * row.kv_heads, 0, 0, [&](int64_t i, NoScratch&) {
    const Example& ex = examples[i / row.kv_heads];
    const int64_t j = i % row.kv_heads;
    pack_transposed(kd + j * k.stride(1) + ex.start * k.stride(2), k.stride(2), ex.length, ex.padded, dim,
                    key_t(j, ex));
    const T* value = vd + j * v.stride(1) + ex.start * v.stride(2);
    float* rows = v_rows + (j * row.padded_total + ex.offset) * dim;  // V in fp32, zero rows past the end
    for (int64_t c = 0; c < ex.padded; c++)
      for (int64_t d = 0; d < dim; d++)
        rows[c * dim + d] = c < ex.length ? static_cast<float>(value[c * v.stride(2) + d]) : 0.f;
  });

  std::vector<Item> items;
  for (int64_t e = 0; e < n_examples; e++)
    for (int64_t h = 0; h < row.heads; h++)
      for (int64_t b = 0; b * kBlock < examples[e].length; b++) items.push_back({e, h, b, b});
  sort_largest_first(items);
  run_items<ForwardScratch<T>>(items.size(), row.widest, dim, [&](int64_t n, ForwardScratch<T>& w) {
    const Item& it = items[n];
    const Example& ex = examples[it.example];
    const int64_t h = it.head, j = h / row.group, row0 = it.block * kBlock;
    const int64_t rows = std::min(kBlock, ex.length - row0), width = round_up(row0 + rows);
    const T* qa = block_rows(qd + h * q.stride(1) + (ex.start + row0) * q.stride(2), rows, q.stride(2), dim,
                             w.a.data());
    gemm<T>(kBlock, width, dim, qa, rows == kBlock ? q.stride(2) : dim, key_t(j, ex), ex.padded, w.s.data(), width,
            false);
    for (int64_t r = 0; r < rows; r++) {
      float* s = w.s.data() + r * width;
      const int64_t valid = row0 + r + 1;
      const float top = fscale * row_max(s, valid), sum = exponentiate(s, valid, fscale, top);
      const float inv = 1.f / sum;
      for (int64_t c = 0; c < valid; c++) s[c] *= inv;
      std::fill(s + valid, s + width, 0.f);
      lsed[h * row.total + ex.start + row0 + r] = top + std::log(sum);
    }
    gemm<float>(kBlock, dim, width, w.s.data(), width, v_rows + (j * row.padded_total + ex.offset) * dim, dim,
                w.o.data(), dim, false);
    for (int64_t r = 0; r < rows; r++)
      convert_row(w.o.data() + r * dim, dim, 1.f, od + ((ex.start + row0 + r) * row.heads + h) * dim);
  });
  return {out, lse};
}

// Per-thread buffers of the backward, for one (example, head) at a time, sized for the longest example.
template <typename T> struct BackwardScratch {
  std::vector<T> query_t, grad_t, probs, dscores, ds_block, a;
  std::vector<float> s, dp, o, delta, dvt, dkt;
  void fit(int64_t width, int64_t dim) {
    grow(query_t, dim * width), grow(grad_t, dim * width), grow(probs, width * width);
    grow(dscores, width * width), grow(ds_block, kBlock * width), grow(a, 2 * kBlock * dim);
    grow(s, kBlock * width), grow(dp, kBlock * width), grow(o, kBlock * dim), grow(delta, width);
    grow(dvt, dim * kBlock), grow(dkt, dim * kBlock);
  }
};

// Where one (example, head) of the backward reads and writes. Row strides: ld; dk_part and dv_part are this
// head's shares of dK and dV (fp32, unscaled), (length x D) each, summed over the head's group afterwards.
template <typename T> struct HeadArgs {
  const T *q, *grad, *out, *key_t, *value_t, *key_rows;
  int64_t q_ld, grad_ld, out_ld;
  const float* lse;
  T* dq;
  float *dk_part, *dv_part;
};

template <typename T>
void backward_head(const Example& ex, const HeadArgs<T>& x, int64_t dim, float scale, BackwardScratch<T>& w) {
  const int64_t pad = ex.padded, length = ex.length;
  transpose(x.q, x.q_ld, length, pad, dim, w.query_t.data());
  transpose(x.grad, x.grad_ld, length, pad, dim, w.grad_t.data());
  for (int64_t r = 0; r < length; r++) {  // delta = rowsum(dO * O), the softmax gradient's correction
    float sum = 0.f;
    for (int64_t d = 0; d < dim; d++)
      sum += static_cast<float>(x.grad[r * x.grad_ld + d]) * static_cast<float>(x.out[r * x.out_ld + d]);
    w.delta[r] = sum;
  }

  // Per block of query rows: P and dS (kept whole, in B layout), and dQ = scale dS K.
  for (int64_t row0 = 0; row0 < length; row0 += kBlock) {
    const int64_t rows = std::min(kBlock, length - row0), width = round_up(row0 + rows);
    float *s = w.s.data(), *dp = w.dp.data();
    const T* qa = block_rows(x.q + row0 * x.q_ld, rows, x.q_ld, dim, w.a.data());
    const T* ga = block_rows(x.grad + row0 * x.grad_ld, rows, x.grad_ld, dim, w.a.data() + kBlock * dim);
    gemm<T>(kBlock, width, dim, qa, rows == kBlock ? x.q_ld : dim, x.key_t, pad, s, width, false);
    gemm<T>(kBlock, width, dim, ga, rows == kBlock ? x.grad_ld : dim, x.value_t, pad, dp, width, false);
    for (int64_t r = 0; r < kBlock; r++) {  // s's rows become P, dp's dS; zero past the causal edge and the end
      // (rows past the example's end are zero rows of the squares, which the column GEMMs below read)
      float *sr = s + r * width, *dr = dp + r * width;
      const int64_t row = row0 + r, valid = row < length ? row + 1 : 0;
      const float l = valid ? x.lse[row] : 0.f, delta = valid ? w.delta[row] : 0.f;
      for (int64_t c = 0; c < valid; c++) {
        const float prob = exp_approx(std::fma(sr[c], scale, -l));
        dr[c] = prob * (dr[c] - delta);
        sr[c] = prob;
      }
      std::fill(sr + valid, sr + width, 0.f);
      std::fill(dr + valid, dr + width, 0.f);
    }
    for (int64_t r = 0; r < kBlock; r += 2) {
      store_row_pair(s + r * width, s + (r + 1) * width, width, row0 + r, pad, w.probs.data());
      store_row_pair(dp + r * width, dp + (r + 1) * width, width, row0 + r, pad, w.dscores.data());
    }
    for (int64_t r = 0; r < rows; r++) convert_row(dp + r * width, width, 1.f, w.ds_block.data() + r * width);
    gemm<T>(kBlock, dim, width, w.ds_block.data(), width, x.key_rows, dim, w.o.data(), dim, false);
    for (int64_t r = 0; r < rows; r++) convert_row(w.o.data() + r * dim, dim, scale, x.dq + (row0 + r) * dim);
  }

  // Per block of key columns, over the rows at or below it: dV^T = dO^T P and dK^T = Q^T dS.
  for (int64_t col0 = 0; col0 < length; col0 += kBlock) {
    const int64_t cols = std::min(kBlock, length - col0), depth = pad - col0;
    const int64_t corner = kVnni<T> ? (col0 / 2 * pad + col0) * 2 : col0 * pad + col0;
    gemm<T>(dim, kBlock, depth, w.grad_t.data() + col0, pad, w.probs.data() + corner, pad, w.dvt.data(), kBlock,
            false);
    gemm<T>(dim, kBlock, depth, w.query_t.data() + col0, pad, w.dscores.data() + corner, pad, w.dkt.data(), kBlock,
            false);
    for (int64_t c = 0; c < cols; c++)
      for (int64_t d = 0; d < dim; d++) {
        x.dv_part[(col0 + c) * dim + d] = w.dvt[d * kBlock + c];
        x.dk_part[(col0 + c) * dim + d] = w.dkt[d * kBlock + c];
      }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        const std::vector<int64_t>& bounds, double scale) {
  const Row row(q, k, bounds);
  const auto& examples = row.examples;
  const int64_t dim = row.dim;
  const float fscale = static_cast<float>(scale);

  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto parts = at::empty({2, row.heads, row.total, dim}, q.options().dtype(at::kFloat));  // each head's dK and dV
  auto packed = at::empty({3, row.kv_heads, row.padded_total * dim}, q.options());  // K^T, V^T and K, as GEMM's B
  const T *qd = q.const_data_ptr<T>(), *kd = k.const_data_ptr<T>(), *vd = v.const_data_ptr<T>();
  const T *gd = grad.const_data_ptr<T>(), *od = out.const_data_ptr<T>();
  T* pk = packed.mutable_data_ptr<T>();
  float* part = parts.mutable_data_ptr<float>();
  const int64_t span = row.kv_heads * row.padded_total * dim;
  auto key_t = [&](int64_t j, const Example& ex) { return pk + (j * row.padded_total + ex.offset) * dim; };

  const int64_t n_examples = examples.size();
  run_items<NoScratch>(n_examples * row.kv_heads, 0, 0, [&](int64_t i, NoScratch&) {
    const Example& ex = examples[i / row.kv_heads];
    const int64_t j = i % row.kv_heads;
    const T* key = kd + j * k.stride(1) + ex.start * k.stride(2);
    pack_transposed(key, k.stride(2), ex.length, ex.padded, dim, key_t(j, ex));
    pack_transposed(vd + j * v.stride(1) + ex.start * v.stride(2), v.stride(2), ex.length, ex.padded, dim,
                    key_t(j, ex) + span);
    pack_rows(key, k.stride(2), ex.length, ex.padded, dim, key_t(j, ex) + 2 * span);
  });

  std::vector<Item> items;
  for (int64_t e = 0; e < n_examples; e++)
    for (int64_t h = 0; h < row.heads; h++) items.push_back({e, h, 0, examples[e].length});
  sort_largest_first(items);
  T* dqd = dq.mutable_data_ptr<T>();
  run_items<BackwardScratch<T>>(items.size(), row.widest, dim, [&](int64_t n, BackwardScratch<T>& w) {
    const Example& ex = examples[items[n].example];
    const int64_t h = items[n].head, j = h / row.group, t = ex.start;
    const HeadArgs<T> x{qd + h * q.stride(1) + t * q.stride(2),
                        gd + h * grad.stride(1) + t * grad.stride(2),
                        od + h * out.stride(1) + t * out.stride(2),
                        key_t(j, ex),
                        key_t(j, ex) + span,
                        key_t(j, ex) + 2 * span,
                        q.stride(2),
                        grad.stride(2),
                        out.stride(2),
                        lse.const_data_ptr<float>() + h * row.total + t,
                        dqd + (h * row.total + t) * dim,
                        part + (h * row.total + t) * dim,
                        part + ((row.heads + h) * row.total + t) * dim};
    backward_head<T>(ex, x, dim, fscale, w);
  });

  // dK = scale * (the sum of the group's shares), dV = the sum.
  T *dkd = dk.mutable_data_ptr<T>(), *dvd = dv.mutable_data_ptr<T>();
  at::parallel_for(0, row.kv_heads * row.total, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const int64_t j = i / row.total, t = i % row.total;
      for (int64_t d = 0; d < dim; d++) {
        float sum_k = 0.f, sum_v = 0.f;
        for (int64_t g = 0; g < row.group; g++) {
          sum_k += part[((j * row.group + g) * row.total + t) * dim + d];
          sum_v += part[((row.heads + j * row.group + g) * row.total + t) * dim + d];
        }
        dkd[i * dim + d] = from_float<T>(fscale * sum_k);
        dvd[i * dim + d] = from_float<T>(sum_v);
      }
    }
  });
  return {dq, dk, dv};
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& bounds) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1, "query must be (1, heads, length, dim)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == 1 && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "key and value must be (1, kv_heads, length, dim) like the query");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(q.size(3) % 2 == 0, "head dim must be even");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "mixed dtypes");
  TORCH_CHECK(bounds.size() >= 2 && bounds.front() == 0 && bounds.back() == q.size(2),
              "bounds must run from 0 to the row's length");
}

std::tuple<at::Tensor, at::Tensor> varlen_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  std::vector<int64_t> bounds, double scale) {
  check(q, k, v, bounds);
  if (q.scalar_type() == at::kBFloat16) return forward<BFloat16>(q, k, v, bounds, scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "bf16 or fp32 only");
  return forward<float>(q, k, v, bounds, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward(const at::Tensor& grad, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               std::vector<int64_t> bounds, double scale) {
  check(q, k, v, bounds);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad and out must be shaped as the query");
  TORCH_CHECK(grad.stride(3) == 1 && out.stride(3) == 1, "head dim must be contiguous");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "lse must be contiguous fp32");
  if (q.scalar_type() == at::kBFloat16) return backward<BFloat16>(grad, q, k, v, out, lse, bounds, scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "bf16 or fp32 only");
  return backward<float>(grad, q, k, v, out, lse, bounds, scale);
}

}  // namespace

TORCH_LIBRARY(tunewise_kernels, m) {
  m.def("varlen_forward", &varlen_forward);
  m.def("varlen_backward", &varlen_backward);
}
