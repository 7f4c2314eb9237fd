// Fused CPU kernels for the transformer blocks' element-wise chains (diffx/models/fused.py builds this file
// with torch.utils.cpp_extension on first use and falls back to eager PyTorch where it cannot).
//
// Eager PyTorch runs each element-wise op as its own pass over memory: a LayerNorm, then the adaLN
// modulation, and in the backward a multiply, a reduction and another multiply for each input. On a CPU
// those passes over (B, N, D) activations that do not fit the cache are what is left of a transformer step
// besides the matmuls and the attention. Each kernel here reads its inputs once and writes its outputs once,
// a row (one token's channels) at a time while the row sits in L1; per-sample or per-channel gradients are
// reduced in the same pass. The formulas are the textbook ones, written out next to each kernel.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename T>
T hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int k = 0; k < Vectorized<T>::size(); ++k) s += buf[k];
  return s;
}

template <typename T>
T row_sum(const T* x, int64_t n) {
  using V = Vectorized<T>;
  V acc(0);
  int64_t d = 0;
  for (; d + V::size() <= n; d += V::size()) acc = acc + V::loadu(x + d);
  T s = hsum(acc);
  for (; d < n; ++d) s += x[d];
  return s;
}

// sum((x - mu)^2)
template <typename T>
T row_centered_sq(const T* x, T mu, int64_t n) {
  using V = Vectorized<T>;
  V acc(0), m(mu);
  int64_t d = 0;
  for (; d + V::size() <= n; d += V::size()) {
    V t = V::loadu(x + d) - m;
    acc = at::vec::fmadd(t, t, acc);
  }
  T s = hsum(acc);
  for (; d < n; ++d) s += (x[d] - mu) * (x[d] - mu);
  return s;
}

// Rows of width D summed into `out` (a gradient reduced over tokens) in blocks of 64 rows: a two-level sum,
// whose float32 round-off grows like (64 + rows / 64) ulp instead of rows ulp for a plain running sum.
// Add each row's terms to row(), then call next(); the destructor adds what is left.
template <typename T>
struct BlockedSum {
  T* out;
  int64_t D, count = 0;
  std::vector<T> block;
  BlockedSum(T* out, int64_t D) : out(out), D(D), block(D, T(0)) {}
  T* row() { return block.data(); }
  void next() {
    if (++count == 64) flush();
  }
  void flush() {
    for (int64_t d = 0; d < D; ++d) out[d] += block[d], block[d] = 0;
    count = 0;
  }
  ~BlockedSum() { flush(); }
};

// ---------------------------------------------------------------------------------------------------------
// adaLN: y = (x - mu) * rstd * (1 + scale_b) + shift_b over each row of x (B, N, D); shift, scale (B, D).
// LayerNorm without affine (Ba et al. 2016), modulated per sample (DiT, Peebles & Xie 2023).
// Backward, with x_hat = (x - mu) * rstd and g = dy * (1 + scale_b):
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dshift_b = sum_n dy,  dscale_b = sum_n dy * x_hat.
std::vector<torch::Tensor> modulated_norm_forward(torch::Tensor x, torch::Tensor shift, torch::Tensor scale,
                                                  double eps) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto y = torch::empty_like(x);
  auto mean = torch::empty({B, N}, x.options());
  auto rstd = torch::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "modulated_norm_forward", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t *X = x.data_ptr<scalar_t>(), *SH = shift.data_ptr<scalar_t>(), *SC = scale.data_ptr<scalar_t>();
    scalar_t *Y = y.data_ptr<scalar_t>(), *MU = mean.data_ptr<scalar_t>(), *RS = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* xr = X + i * D;
        const scalar_t *sh = SH + (i / N) * D, *sc = SC + (i / N) * D;
        scalar_t* yr = Y + i * D;
        const scalar_t mu = row_sum(xr, D) / D;
        const scalar_t r = scalar_t(1) / std::sqrt(row_centered_sq(xr, mu, D) / D + scalar_t(eps));
        MU[i] = mu;
        RS[i] = r;
        const V vmu(mu), vr(r), one(1);
        int64_t d = 0;
        for (; d + V::size() <= D; d += V::size()) {
          V xh = (V::loadu(xr + d) - vmu) * vr;
          at::vec::fmadd(xh, one + V::loadu(sc + d), V::loadu(sh + d)).store(yr + d);
        }
        for (; d < D; ++d) yr[d] = (xr[d] - mu) * r * (1 + sc[d]) + sh[d];
      }
    });
  });
  return {y, mean, rstd};
}

std::vector<torch::Tensor> modulated_norm_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor mean,
                                                   torch::Tensor rstd, torch::Tensor scale) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto dx = torch::empty_like(x);
  auto dshift = torch::zeros({B, D}, x.options());
  auto dscale = torch::zeros({B, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "modulated_norm_backward", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t *DY = dy.data_ptr<scalar_t>(), *X = x.data_ptr<scalar_t>(), *SC = scale.data_ptr<scalar_t>();
    const scalar_t *MU = mean.data_ptr<scalar_t>(), *RS = rstd.data_ptr<scalar_t>();
    scalar_t *DX = dx.data_ptr<scalar_t>(), *DSH = dshift.data_ptr<scalar_t>(), *DSC = dscale.data_ptr<scalar_t>();
    // One sample's rows per task, so its dshift and dscale rows have one writer.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* sc = SC + b * D;
        BlockedSum<scalar_t> dshift_b(DSH + b * D, D), dscale_b(DSC + b * D, D);
        scalar_t *dsh = dshift_b.row(), *dsc = dscale_b.row();
        for (int64_t n = 0; n < N; ++n) {
          const int64_t i = b * N + n;
          const scalar_t *xr = X + i * D, *dyr = DY + i * D;
          scalar_t* dxr = DX + i * D;
          const V vmu(MU[i]), vr(RS[i]), one(1);
          V sum_g(0), sum_gx(0);
          int64_t d = 0;
          for (; d + V::size() <= D; d += V::size()) {
            V xh = (V::loadu(xr + d) - vmu) * vr, g0 = V::loadu(dyr + d), g = g0 * (one + V::loadu(sc + d));
            (V::loadu(dsh + d) + g0).store(dsh + d);
            at::vec::fmadd(g0, xh, V::loadu(dsc + d)).store(dsc + d);
            sum_g = sum_g + g;
            sum_gx = at::vec::fmadd(g, xh, sum_gx);
          }
          scalar_t sg = hsum(sum_g), sgx = hsum(sum_gx);
          for (int64_t e = d; e < D; ++e) {
            scalar_t xh = (xr[e] - MU[i]) * RS[i], g = dyr[e] * (1 + sc[e]);
            dsh[e] += dyr[e];
            dsc[e] += dyr[e] * xh;
            sg += g;
            sgx += g * xh;
          }
          const V a(sg / D), c(sgx / D);
          d = 0;
          for (; d + V::size() <= D; d += V::size()) {
            V xh = (V::loadu(xr + d) - vmu) * vr, g = V::loadu(dyr + d) * (one + V::loadu(sc + d));
            (vr * (g - a - xh * c)).store(dxr + d);
          }
          for (; d < D; ++d) {
            scalar_t xh = (xr[d] - MU[i]) * RS[i], g = dyr[d] * (1 + sc[d]);
            dxr[d] = RS[i] * (g - sg / D - xh * (sgx / D));
          }
          dshift_b.next();
          dscale_b.next();
        }
      }
    });
  });
  return {dx, dshift, dscale};
}

// ---------------------------------------------------------------------------------------------------------
// Gated residual (adaLN-Zero) of a linear layer's output: out = x + gate_b * (h + bias), x and h (B, N, D),
// h = the bias-free matmul, gate (B, D), bias (D). One pass forward; backward (dx = dout is passed through):
//   dh = dout * gate_b,  dgate_b = sum_n dout * (h + bias),  dbias = sum over b and n of dh.
torch::Tensor gated_forward(torch::Tensor x, torch::Tensor gate, torch::Tensor h, torch::Tensor bias) {
  const int64_t B = h.size(0), N = h.size(1), D = h.size(2);
  auto out = torch::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gated_forward", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t *X = x.data_ptr<scalar_t>(), *G = gate.data_ptr<scalar_t>(), *H = h.data_ptr<scalar_t>();
    const scalar_t* Bi = bias.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* g = G + (i / N) * D;
        const int64_t off = i * D;
        int64_t d = 0;
        for (; d + V::size() <= D; d += V::size())
          at::vec::fmadd(V::loadu(g + d), V::loadu(H + off + d) + V::loadu(Bi + d), V::loadu(X + off + d)).store(O + off + d);
        for (; d < D; ++d) O[off + d] = X[off + d] + g[d] * (H[off + d] + Bi[d]);
      }
    });
  });
  return out;
}

std::vector<torch::Tensor> gated_backward(torch::Tensor dout, torch::Tensor h, torch::Tensor bias, torch::Tensor gate) {
  const int64_t B = h.size(0), N = h.size(1), D = h.size(2);
  auto dh = torch::empty_like(h);
  auto dgate = torch::zeros({B, D}, h.options());
  auto partial = torch::zeros({at::get_num_threads(), D}, h.options());  // dbias, one row per thread
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gated_backward", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t *DO = dout.data_ptr<scalar_t>(), *H = h.data_ptr<scalar_t>(), *G = gate.data_ptr<scalar_t>();
    const scalar_t* Bi = bias.data_ptr<scalar_t>();
    scalar_t *DH = dh.data_ptr<scalar_t>(), *DG = dgate.data_ptr<scalar_t>(), *P = partial.data_ptr<scalar_t>();
    // One sample's rows per task, so its dgate row has one writer.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      BlockedSum<scalar_t> dbias_sum(P + at::get_thread_num() * D, D);
      scalar_t* db = dbias_sum.row();
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* g = G + b * D;
        BlockedSum<scalar_t> dgate_b(DG + b * D, D);
        scalar_t* dg = dgate_b.row();
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (b * N + n) * D;
          int64_t d = 0;
          for (; d + V::size() <= D; d += V::size()) {
            V o = V::loadu(DO + off + d), dhv = o * V::loadu(g + d);
            dhv.store(DH + off + d);
            (V::loadu(db + d) + dhv).store(db + d);
            at::vec::fmadd(o, V::loadu(H + off + d) + V::loadu(Bi + d), V::loadu(dg + d)).store(dg + d);
          }
          for (; d < D; ++d) {
            DH[off + d] = DO[off + d] * g[d];
            db[d] += DH[off + d];
            dg[d] += DO[off + d] * (H[off + d] + Bi[d]);
          }
          dgate_b.next();
          dbias_sum.next();
        }
      }
    });
  });
  return {dh, dgate, partial.sum(0)};
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm over the last dim of a 4-D x (e.g. per-head q or k, (B, H, N, Dh)) whose last dim is contiguous
// and whose other strides are anything (the heads' view of a projection): y = x * r * w,
// r = (mean(x^2) + eps)^(-1/2) (Zhang & Sennrich 2019). Backward, with x_hat = x * r and g = dy * w:
//   dx = r * (g - x_hat * mean(g * x_hat)),  dw = sum over rows of dy * x_hat.
struct Rows {
  int64_t n1, n2, s0, s1, s2;  // a row index i = (i0 * n1 + i1) * n2 + i2 -> offset i0 s0 + i1 s1 + i2 s2
  explicit Rows(const torch::Tensor& t)
      : n1(t.size(1)), n2(t.size(2)), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  int64_t operator()(int64_t i) const { return (i / (n1 * n2)) * s0 + ((i / n2) % n1) * s1 + (i % n2) * s2; }
};

std::vector<torch::Tensor> rms_norm_forward(torch::Tensor x, torch::Tensor w, double eps) {
  const int64_t rows = x.size(0) * x.size(1) * x.size(2), D = x.size(3);
  auto y = torch::empty_like(x);
  auto r = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_forward", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t *X = x.data_ptr<scalar_t>(), *W = w.data_ptr<scalar_t>();
    scalar_t *Y = y.data_ptr<scalar_t>(), *R = r.data_ptr<scalar_t>();
    const Rows xo(x), yo(y);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* xr = X + xo(i);
        scalar_t* yr = Y + yo(i);
        const scalar_t ri = scalar_t(1) / std::sqrt(row_centered_sq(xr, scalar_t(0), D) / D + scalar_t(eps));
        R[i] = ri;
        const V vr(ri);
        int64_t d = 0;
        for (; d + V::size() <= D; d += V::size()) (V::loadu(xr + d) * vr * V::loadu(W + d)).store(yr + d);
        for (; d < D; ++d) yr[d] = xr[d] * ri * W[d];
      }
    });
  });
  return {y, r};
}

std::vector<torch::Tensor> rms_norm_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor r, torch::Tensor w,
                                             bool weight_grad) {
  const int64_t rows = x.size(0) * x.size(1) * x.size(2), D = x.size(3);
  auto dx = torch::empty_like(x);
  const int64_t threads = at::get_num_threads();
  auto partial = torch::zeros({threads, D}, x.options());  // dw, one row per thread
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_backward", [&] {
    using V = Vectorized<scalar_t>;
    const scalar_t *DYp = dy.data_ptr<scalar_t>(), *X = x.data_ptr<scalar_t>(), *R = r.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    scalar_t *DX = dx.data_ptr<scalar_t>(), *P = partial.data_ptr<scalar_t>();
    const Rows xo(x), dyo(dy), dxo(dx);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      BlockedSum<scalar_t> dw_sum(P + at::get_thread_num() * D, D);
      scalar_t* dw = dw_sum.row();
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t *xr = X + xo(i), *dyr = DYp + dyo(i);
        scalar_t* dxr = DX + dxo(i);
        const scalar_t ri = R[i];
        const V vr(ri);
        V acc(0);
        int64_t d = 0;
        for (; d + V::size() <= D; d += V::size()) {
          V xh = V::loadu(xr + d) * vr, g0 = V::loadu(dyr + d);
          acc = at::vec::fmadd(g0 * V::loadu(W + d), xh, acc);
          if (weight_grad) at::vec::fmadd(g0, xh, V::loadu(dw + d)).store(dw + d);
        }
        scalar_t s = hsum(acc);
        for (int64_t e = d; e < D; ++e) {
          s += dyr[e] * W[e] * xr[e] * ri;
          if (weight_grad) dw[e] += dyr[e] * xr[e] * ri;
        }
        const V c(s / D);
        d = 0;
        for (; d + V::size() <= D; d += V::size()) {
          V xh = V::loadu(xr + d) * vr, g = V::loadu(dyr + d) * V::loadu(W + d);
          (vr * (g - xh * c)).store(dxr + d);
        }
        for (; d < D; ++d) dxr[d] = ri * (dyr[d] * W[d] - xr[d] * ri * (s / D));
        if (weight_grad) dw_sum.next();
      }
    });
  });
  return {dx, partial.sum(0)};
}

// ---------------------------------------------------------------------------------------------------------
// GELU of a biased pre-activation, a = h + b, h (M, F) a bias-free linear's output, b (F):
//   exact   gelu(a) = a Phi(a) = a/2 (1 + erf(a / sqrt 2)),  gelu'(a) = Phi(a) + a phi(a);
//   tanh    gelu(a) = a/2 (1 + t), t = tanh(k (a + 0.044715 a^3)), k = sqrt(2 / pi)
//           gelu'(a) = (1 + t)/2 + a/2 (1 - t^2) k (1 + 3 * 0.044715 a^2)   (Hendrycks & Gimpel 2016).
// The backward returns dh = dg * gelu'(a) and db = sum over rows of dh, in one pass.
// erf(x) = 1 - (p1 t + ... + p5 t^5) exp(-x^2), t = 1 / (1 + p |x|), odd in x (Abramowitz & Stegun 7.1.26,
// |error| < 1.5e-7, the form ATen's vectorised erf uses), with exp(-x^2) = exp(-a^2 / 2) computed once and
// shared with phi(a) in the backward, by ATen's faster exp (exp_u20: 20 ulp, i.e. ~1e-6 relative, below the
// approximation's own error once multiplied by t's polynomial). float32 only; float64 takes ATen's erf and exp.
template <typename T>
struct Gelu {
  using V = Vectorized<T>;
  static constexpr T kAlpha = T(0.70710678118654752440);   // 1 / sqrt 2
  static constexpr T kBeta = T(0.39894228040143267794);    // 1 / sqrt(2 pi)
  static constexpr T kKappa = T(0.79788456080286535588);   // sqrt(2 / pi)
  static constexpr T kCubic = T(0.044715);
  // 1 + erf(a / sqrt 2) given e = exp(-a^2 / 2)
  static V one_plus_erf(V a, V e) {
    const V one(1), zero(0);
    if constexpr (!std::is_same_v<T, float>) return one + (a * V(kAlpha)).erf();  // float64: ATen's (Sleef) erf
    V t = one / at::vec::fmadd(V(T(0.3275911) * kAlpha), a.abs(), one);
    V r = at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(V(T(1.061405429)), t, V(T(-1.453152027))), t,
                                                       V(T(1.421413741))), t, V(T(-0.284496736))), t, V(T(0.254829592)));
    V tail = r * t * e;  // 1 - erf(|x|)
    return V::blendv(V(2) - tail, tail, a < zero);
  }
  static V exp(V x) {
    if constexpr (std::is_same_v<T, float>) return x.exp_u20();
    return x.exp();
  }
  static V value(V a, bool tanh) {
    const V half(0.5), one(1);
    if (!tanh) return half * a * one_plus_erf(a, exp(V(T(-0.5)) * a * a));
    V t = (V(kKappa) * (a + V(kCubic) * a * a * a)).tanh();
    return half * a * (one + t);
  }
  static V grad(V a, bool tanh) {
    const V half(0.5), one(1);
    if (!tanh) {
      V e = exp(V(T(-0.5)) * a * a);
      return at::vec::fmadd(a * V(kBeta), e, half * one_plus_erf(a, e));
    }
    V t = (V(kKappa) * (a + V(kCubic) * a * a * a)).tanh();
    return half * (one + t) + half * a * (one - t * t) * V(kKappa) * (one + V(3 * kCubic) * a * a);
  }
  static T value(T a, bool tanh) {
    if (!tanh) return T(0.5) * a * (1 + std::erf(a * kAlpha));
    return T(0.5) * a * (1 + std::tanh(kKappa * (a + kCubic * a * a * a)));
  }
  static T grad(T a, bool tanh) {
    if (!tanh) return T(0.5) * (1 + std::erf(a * kAlpha)) + a * kBeta * std::exp(T(-0.5) * a * a);
    T t = std::tanh(kKappa * (a + kCubic * a * a * a));
    return T(0.5) * (1 + t) + T(0.5) * a * (1 - t * t) * kKappa * (1 + 3 * kCubic * a * a);
  }
};

torch::Tensor bias_gelu_forward(torch::Tensor h, torch::Tensor b, bool tanh) {
  const int64_t M = h.size(0), F = h.size(1);
  auto g = torch::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bias_gelu_forward", [&] {
    using V = Vectorized<scalar_t>;
    using G = Gelu<scalar_t>;
    const scalar_t *H = h.data_ptr<scalar_t>(), *Bp = b.data_ptr<scalar_t>();
    scalar_t* Out = g.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* hr = H + m * F;
        scalar_t* out = Out + m * F;
        int64_t f = 0;
        for (; f + V::size() <= F; f += V::size()) G::value(V::loadu(hr + f) + V::loadu(Bp + f), tanh).store(out + f);
        for (; f < F; ++f) out[f] = G::value(hr[f] + Bp[f], tanh);
      }
    });
  });
  return g;
}

std::vector<torch::Tensor> bias_gelu_backward(torch::Tensor dg, torch::Tensor h, torch::Tensor b, bool tanh) {
  const int64_t M = h.size(0), F = h.size(1);
  auto dh = torch::empty_like(h);
  const int64_t threads = at::get_num_threads();
  auto partial = torch::zeros({threads, F}, h.options());  // db, one row per thread
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bias_gelu_backward", [&] {
    using V = Vectorized<scalar_t>;
    using G = Gelu<scalar_t>;
    const scalar_t *DG = dg.data_ptr<scalar_t>(), *H = h.data_ptr<scalar_t>(), *Bp = b.data_ptr<scalar_t>();
    scalar_t *DH = dh.data_ptr<scalar_t>(), *P = partial.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      BlockedSum<scalar_t> db_sum(P + at::get_thread_num() * F, F);
      scalar_t* db = db_sum.row();
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t *hr = H + m * F, *dgr = DG + m * F;
        scalar_t* dhr = DH + m * F;
        int64_t f = 0;
        for (; f + V::size() <= F; f += V::size()) {
          V d = V::loadu(dgr + f) * G::grad(V::loadu(hr + f) + V::loadu(Bp + f), tanh);
          d.store(dhr + f);
          (V::loadu(db + f) + d).store(db + f);
        }
        for (; f < F; ++f) {
          dhr[f] = dgr[f] * G::grad(hr[f] + Bp[f], tanh);
          db[f] += dhr[f];
        }
        db_sum.next();
      }
    });
  });
  return {dh, partial.sum(0)};
}

int64_t vector_width() { return Vectorized<float>::size(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("modulated_norm_forward", &modulated_norm_forward);
  m.def("modulated_norm_backward", &modulated_norm_backward);
  m.def("gated_forward", &gated_forward);
  m.def("gated_backward", &gated_backward);
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
  m.def("bias_gelu_forward", &bias_gelu_forward);
  m.def("bias_gelu_backward", &bias_gelu_backward);
  m.def("vector_width", &vector_width, "floats per SIMD register the kernels were built for");
}
