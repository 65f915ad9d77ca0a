// One Kaldi fbank frame, from samples to features, written once for the GPU and the CPU.
//
// Every function here is __host__ __device__. The per-frame pipeline is templated on a Team: the
// CUDA kernel passes a warp (32 lanes, __syncwarp, shuffle sums); the host test harness passes a
// team of one, or threads standing in for the lanes (which catches a missing sync). The same
// arithmetic therefore runs in fbank.cu and in fbank_host_test.cpp, which is how the kernel's
// numbers, and its lane decomposition, are checked against torchaudio without a GPU.
//
// Precision: samples are converted to double and stay double through the FFT and the Mel sums, so
// bins far below a frame's peak (tones, sweeps) keep their log to 1e-3 (see kernels/fbank.py).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FBANK_HD __host__ __device__ __forceinline__
// Templates below also run on a device-only Team (the warp); nvcc must not check them as host code.
#define FBANK_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define FBANK_HD inline
#define FBANK_HD_TEMPLATE
#endif

namespace fbank {

constexpr double kLogFloor = 1.1920928955078125e-07;  // FLT_EPSILON, Kaldi's floor before a log
constexpr double kSqrtHalf = 0.70710678118654752440;

struct alignas(16) Complex {
  double re, im;
};

FBANK_HD Complex operator+(Complex a, Complex b) { return {a.re + b.re, a.im + b.im}; }
FBANK_HD Complex operator-(Complex a, Complex b) { return {a.re - b.re, a.im - b.im}; }
FBANK_HD Complex scale(Complex a, double s) { return {a.re * s, a.im * s}; }
FBANK_HD Complex conj(Complex a) { return {a.re, -a.im}; }
FBANK_HD Complex times_minus_i(Complex a) { return {a.im, -a.re}; }
FBANK_HD Complex operator*(Complex a, Complex b) {
  return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}

// Forward DFTs (exponent sign -1) of R points held in registers, in place.
FBANK_HD void dft2(Complex* v) {
  const Complex a = v[0];
  v[0] = a + v[1];
  v[1] = a - v[1];
}

FBANK_HD void dft4(Complex* v) {
  const Complex even_sum = v[0] + v[2], even_diff = v[0] - v[2];
  const Complex odd_sum = v[1] + v[3], odd_diff = times_minus_i(v[1] - v[3]);
  v[0] = even_sum + odd_sum;
  v[1] = even_diff + odd_diff;
  v[2] = even_sum - odd_sum;
  v[3] = even_diff - odd_diff;
}

FBANK_HD void dft8(Complex* v) {
  Complex even[4] = {v[0], v[2], v[4], v[6]};
  Complex odd[4] = {v[1], v[3], v[5], v[7]};
  dft4(even);
  dft4(odd);
  // odd[k] *= exp(-2 pi i k / 8)
  odd[1] = scale(Complex{odd[1].re + odd[1].im, odd[1].im - odd[1].re}, kSqrtHalf);
  odd[2] = times_minus_i(odd[2]);
  odd[3] = scale(Complex{odd[3].im - odd[3].re, -odd[3].re - odd[3].im}, kSqrtHalf);
  for (int k = 0; k < 4; ++k) {
    v[k] = even[k] + odd[k];
    v[k + 4] = even[k] - odd[k];
  }
}

template <int R>
FBANK_HD void dft(Complex* v) {
  if (R == 2) dft2(v);
  if (R == 4) dft4(v);
  if (R == 8) dft8(v);
}

// One radix-R Stockham pass over n points: sub-transforms of length `span` become length span*R.
// twiddles[t] = exp(-2 pi i t / n). Output is in natural order after the last pass, no bit reversal.
FBANK_HD_TEMPLATE
template <int R, class Team>
FBANK_HD void stockham_pass(const Team& team, const Complex* src, Complex* dst, int n, int span,
                            const Complex* twiddles) {
  const int items = n / R;
  const int twiddle_step = n / (span * R);
  for (int j = team.rank(); j < items; j += team.size()) {
    const int k = j & (span - 1);
    Complex v[R];
    for (int r = 0; r < R; ++r) v[r] = src[j + r * items];
    if (span > 1) {
      for (int r = 1; r < R; ++r) v[r] = v[r] * twiddles[k * r * twiddle_step];
    }
    dft<R>(v);
    const int base = (j - k) * R + k;
    for (int r = 0; r < R; ++r) dst[base + r * span] = v[r];
  }
}

// Forward complex FFT of n (a power of two) points in `a`, using `b` as the other half of the
// ping-pong; returns whichever buffer holds the result.
FBANK_HD_TEMPLATE
template <class Team>
FBANK_HD Complex* fft(const Team& team, Complex* a, Complex* b, int n, const Complex* twiddles) {
  for (int span = 1; span < n;) {
    const int remaining = n / span;
    if (remaining >= 8) {
      stockham_pass<8>(team, a, b, n, span, twiddles);
      span *= 8;
    } else if (remaining == 4) {
      stockham_pass<4>(team, a, b, n, span, twiddles);
      span *= 4;
    } else {
      stockham_pass<2>(team, a, b, n, span, twiddles);
      span *= 2;
    }
    team.sync();
    Complex* t = a;
    a = b;
    b = t;
  }
  return a;
}

// |X[k]|^2 of the real sequence y[0..2n) whose halves were packed as z = y[even] + i y[odd] and
// transformed to Z; real_twiddle = exp(-2 pi i k / (2n)).
FBANK_HD double real_spectrum_power(const Complex* Z, int n, int k, Complex real_twiddle) {
  const Complex zk = Z[k], zc = conj(Z[(n - k) & (n - 1)]);
  const Complex even = scale(zk + zc, 0.5);
  const Complex odd = scale(times_minus_i(zk - zc), 0.5);
  const Complex x = even + real_twiddle * odd;
  return x.re * x.re + x.im * x.im;
}

// max(value, floor) that keeps a NaN (fmax would return the floor): NaN samples give NaN features,
// as torchaudio's and the torch path's clamp_min do, instead of a silent log floor.
FBANK_HD double at_least(double value, double floor) { return value < floor ? floor : value; }
FBANK_HD float at_least(float value, float floor) { return value < floor ? floor : value; }
FBANK_HD float log_floored(double value, float) { return logf(at_least(static_cast<float>(value), static_cast<float>(kLogFloor))); }
FBANK_HD double log_floored(double value, double) { return log(at_least(value, kLogFloor)); }

// The options and tables of one call. Tables are built on the host by kernels/fbank.py.
struct FrameConfig {
  int window_size;    // W samples per frame
  int padded_size;    // P, a power of two >= W; the complex FFT has P/2 points
  int64_t window_shift;
  int64_t reflect_pad;  // samples mirrored before the clip when !snip_edges (negative: skipped)
  bool snip_edges, remove_dc_offset, raw_energy, use_energy, htk_compat, use_log_fbank, use_power;
  double preemphasis_coefficient;
  double energy_floor;
  int num_mel_bins;
  int mel_width;                  // row stride of mel_weights
  const double* window;           // [W]
  const Complex* fft_twiddles;    // [P/2]  exp(-2 pi i k / (P/2))
  const Complex* real_twiddles;   // [P/2]  exp(-2 pi i k / P)
  const int* mel_start;           // [num_mel_bins]
  const int* mel_len;             // [num_mel_bins]
  const double* mel_weights;      // [num_mel_bins, mel_width]
};

// The one place the call's options and table pointers become a FrameConfig (launcher and harness).
inline FrameConfig make_frame_config(int window_size, int padded_size, int64_t window_shift, int64_t reflect_pad,
                               int snip_edges, int remove_dc_offset, double preemphasis_coefficient,
                               int raw_energy, double energy_floor, int use_energy, int htk_compat,
                               int use_log_fbank, int use_power, int num_mel_bins, int mel_width,
                               const double* window, const double* fft_twiddles, const double* real_twiddles,
                               const int* mel_start, const int* mel_len, const double* mel_weights) {
  FrameConfig c;
  c.window_size = window_size;
  c.padded_size = padded_size;
  c.window_shift = window_shift;
  c.reflect_pad = reflect_pad;
  c.snip_edges = snip_edges;
  c.remove_dc_offset = remove_dc_offset;
  c.raw_energy = raw_energy;
  c.use_energy = use_energy;
  c.htk_compat = htk_compat;
  c.use_log_fbank = use_log_fbank;
  c.use_power = use_power;
  c.preemphasis_coefficient = preemphasis_coefficient;
  c.energy_floor = energy_floor;
  c.num_mel_bins = num_mel_bins;
  c.mel_width = mel_width;
  c.window = window;
  c.fft_twiddles = reinterpret_cast<const Complex*>(fft_twiddles);
  c.real_twiddles = reinterpret_cast<const Complex*>(real_twiddles);
  c.mel_start = mel_start;
  c.mel_len = mel_len;
  c.mel_weights = mel_weights;
  return c;
}

FBANK_HD int64_t frames_of_clip(const FrameConfig& c, int64_t length) {
  if (c.snip_edges) return length < c.window_size ? 0 : 1 + (length - c.window_size) / c.window_shift;
  return (length + c.window_shift / 2) / c.window_shift;
}

// Index into a clip of `length` samples, reflected about its ends as Kaldi does (-1 -> 0, L -> L-1).
FBANK_HD int64_t reflect(int64_t k, int64_t length) {
  if (k < 0) k = -k - 1;
  if (k >= length) k = 2 * length - 1 - k;
  return k;
}

// Features of frame `frame` of one clip into out[0..num_mel_bins + use_energy).
// a and b: P doubles each (16-byte aligned) of scratch, private to the team.
FBANK_HD_TEMPLATE
template <class Team, class scalar_t>
FBANK_HD void compute_frame(const Team& team, const FrameConfig& c, const scalar_t* clip, int64_t length,
                            int64_t frame, double* a, double* b, scalar_t* out) {
  const int num_features = c.num_mel_bins + (c.use_energy ? 1 : 0);
  if (frame >= frames_of_clip(c, length)) {
    for (int m = team.rank(); m < num_features; m += team.size()) out[m] = scalar_t(0);
    return;
  }
  const int W = c.window_size, P = c.padded_size, n = P / 2;
  const int64_t first = frame * c.window_shift - c.reflect_pad;

  double sum = 0.0;
  for (int j = team.rank(); j < W; j += team.size()) {
    const int64_t k = c.snip_edges ? first + j : reflect(first + j, length);
    a[j] = static_cast<double>(clip[k]);
    sum += a[j];
  }
  const double mean = c.remove_dc_offset ? team.sum(sum) / W : 0.0;
  team.sync();

  double raw_energy = 0.0, windowed_energy = 0.0;
  for (int j = team.rank(); j < P; j += team.size()) {
    double y = 0.0;
    if (j < W) {
      const double x = a[j] - mean;
      const double previous = a[j > 0 ? j - 1 : 0] - mean;
      raw_energy += x * x;
      y = c.window[j] * (x - c.preemphasis_coefficient * previous);
    }
    windowed_energy += y * y;
    b[j] = y;
  }
  const double energy = team.sum(c.raw_energy ? raw_energy : windowed_energy);
  team.sync();

  // b holds y[0..P) = z[0..n) with z[m] = y[2m] + i y[2m+1].
  Complex* spectrum = fft(team, reinterpret_cast<Complex*>(b), reinterpret_cast<Complex*>(a), n, c.fft_twiddles);
  double* power = reinterpret_cast<double*>(spectrum) == a ? b : a;
  for (int k = team.rank(); k < n; k += team.size()) {
    const double p = real_spectrum_power(spectrum, n, k, c.real_twiddles[k]);
    power[k] = c.use_power ? p : sqrt(p);
  }
  team.sync();

  const int mel_column = c.use_energy && !c.htk_compat ? 1 : 0;
  for (int m = team.rank(); m < c.num_mel_bins; m += team.size()) {
    const double* weights = c.mel_weights + static_cast<int64_t>(m) * c.mel_width;
    const double* bins = power + c.mel_start[m];
    double e = 0.0;
    for (int i = 0; i < c.mel_len[m]; ++i) e += weights[i] * bins[i];
    out[mel_column + m] = c.use_log_fbank ? log_floored(e, scalar_t()) : static_cast<scalar_t>(e);
  }
  if (c.use_energy && team.rank() == 0) {
    double log_energy = log(at_least(energy, kLogFloor));
    if (c.energy_floor > 0.0) log_energy = at_least(log_energy, log(c.energy_floor));
    out[c.htk_compat ? c.num_mel_bins : 0] = static_cast<scalar_t>(log_energy);
  }
}

// The team of one that runs the pipeline serially on the host.
struct SerialTeam {
  FBANK_HD int rank() const { return 0; }
  FBANK_HD int size() const { return 1; }
  FBANK_HD void sync() const {}
  FBANK_HD double sum(double v) const { return v; }
};

}  // namespace fbank
