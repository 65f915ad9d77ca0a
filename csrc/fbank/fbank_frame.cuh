// One Kaldi fbank frame, from samples to features, written once for the GPU and the CPU.
//
// Every function here is __host__ __device__. The per-frame pipeline is templated on a Team: the
// CUDA kernel passes a warp (32 lanes, __syncwarp, shuffle sums); the host test harness passes a
// team of one, or threads standing in for the lanes (which catches a missing sync). The same
// arithmetic therefore runs in fbank.cu and in fbank_host_test.cpp, which is how the kernel's
// numbers, and its lane decomposition, are checked against torchaudio without a GPU.
//
// The Team interface: rank(), size(), sync(), sum(double) and shuffle(double, source_lane). A team
// of 32 (the warp, or 32 host threads) takes compute_frame_512 for the frames it serves.
//
// Precision: samples are converted to double and stay double through the FFT, so bins far below
// a frame's peak (tones, sweeps) keep their log to 1e-3 (see kernels/fbank.py); the Mel sums of
// positive terms run in the features' type (MelSum).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FBANK_HD __host__ __device__ __forceinline__
// Templates below also run on a device-only Team (the warp); nvcc must not check them as host code.
#define FBANK_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#define FBANK_UNROLL _Pragma("unroll")
#else
#define FBANK_UNROLL
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
FBANK_HD void dft(Complex* v) {  // R == 1: nothing to do
  if (R == 2) dft2(v);
  if (R == 4) dft4(v);
  if (R == 8) dft8(v);
}

// Position of complex element i in a shared-memory FFT buffer: one spare slot after every 8.
// The first radix-8 pass stores lane j's 8 outputs at 8j..8j+7, a 128-byte stride that puts all
// 32 lanes' 16-byte stores in the same four banks (32-way conflicts, a quarter of the kernel's
// shared-memory traffic at 512 points); with the spare slot the stride is 144 bytes and the
// stores of each 8 lanes fall in 8 different bank groups. Runs of 8 consecutive elements stay
// contiguous, so the lane-consecutive loads and the later passes' stores stay conflict-free.
FBANK_HD int padded_index(int i) { return i + (i >> 3); }

// Complex slots of a padded buffer of n elements.
FBANK_HD int padded_length(int n) { return n + (n >> 3); }

// Doubles of shared scratch that compute_frame needs per buffer (it takes two) for a padded frame
// of `padded_size` samples: a complex FFT of padded_size / 2 points in the padded layout.
FBANK_HD int scratch_doubles(int padded_size) { return 2 * padded_length(padded_size / 2); }

// One radix-R Stockham pass over n points, both buffers in the padded layout: sub-transforms of
// length `span` become length span*R. Output is in natural order after the last pass, no bit
// reversal. The twiddles are stored pass by pass (see fft_passes): this pass's factor for input r
// of sub-transform position k, exp(-2 pi i k r / (span R)), is twiddles[r span + k], so the lanes
// of a warp (consecutive k, one r at a time) read consecutive entries from a 128-byte line
// boundary, where one table of exp(-2 pi i t / n) had them read entries r n / (span R) apart.
FBANK_HD_TEMPLATE
template <int R, class Team>
FBANK_HD void stockham_pass(const Team& team, const Complex* src, Complex* dst, int n, int span,
                            const Complex* twiddles) {
  const int items = n / R;
  for (int j = team.rank(); j < items; j += team.size()) {
    const int k = j & (span - 1);
    Complex v[R];
    for (int r = 0; r < R; ++r) v[r] = src[padded_index(j + r * items)];
    if (span > 1) {
      for (int r = 1; r < R; ++r) v[r] = v[r] * twiddles[r * span + k];
    }
    dft<R>(v);
    const int base = (j - k) * R + k;
    for (int r = 0; r < R; ++r) dst[padded_index(base + r * span)] = v[r];
  }
}

// The largest radix (8, 4, 2, or 1 for a single point) that the next pass over n points at
// sub-transform length `span` takes.
FBANK_HD int pass_radix(int n, int span) {
  const int remaining = n / span;
  return remaining >= 8 ? 8 : remaining;
}

// The Stockham passes of a forward complex FFT of n (a power of two) points from sub-transform
// length `span` on (1: the whole FFT), `a` holding the input in the padded layout and `b` the other
// half of the ping-pong; returns whichever buffer holds the result. `twiddles` holds n entries,
// pass by pass: the pass at span s > 1 (radix R = pass_radix(n, s)) owns entries [s, s R); the
// first pass needs none and entries [0, R1) are unused (kernels/fbank.py's fft_pass_twiddles
// builds the table).
FBANK_HD_TEMPLATE
template <class Team>
FBANK_HD Complex* fft_passes(const Team& team, Complex* a, Complex* b, int n, int span, const Complex* twiddles) {
  while (span < n) {
    const int radix = pass_radix(n, span);
    if (radix == 8) {
      stockham_pass<8>(team, a, b, n, span, twiddles);
    } else if (radix == 4) {
      stockham_pass<4>(team, a, b, n, span, twiddles);
    } else {
      stockham_pass<2>(team, a, b, n, span, twiddles);
    }
    span *= radix;
    team.sync();
    Complex* t = a;
    a = b;
    b = t;
  }
  return a;
}

// |X[k]|^2 and |X[n - k]|^2 of the real sequence y[0..2n) whose halves were packed as
// z = y[even] + i y[odd] and transformed to Z (padded layout); real_twiddle = exp(-2 pi i k / (2n)).
// X[k] = E + t O with E = (Z[k] + conj Z[n-k]) / 2, O = -i (Z[k] - conj Z[n-k]) / 2, t the twiddle;
// X[n - k] reads the same two values: it is conj(E - t O). One load of each serves both bins.
// kHalved = false leaves the halves out and returns 4 |X|^2 (four multiplications fewer; the
// caller folds the exact 1/4 into its stored scale, store_powers): for float features, whose
// frames cannot come near double's range. Double features keep the halves, so that |X|^2 is as
// far from overflow as it can be.
struct PowerPair {
  double low, high;  // |X[k]|^2, |X[n - k]|^2 (times 4 unless kHalved)
};
template <bool kHalved>
FBANK_HD PowerPair real_spectrum_powers(const Complex* Z, int n, int k, Complex real_twiddle) {
  const Complex zk = Z[padded_index(k)], zc = conj(Z[padded_index((n - k) & (n - 1))]);
  Complex even = zk + zc, odd = times_minus_i(zk - zc);
  if (kHalved) {
    even = scale(even, 0.5);
    odd = scale(odd, 0.5);
  }
  odd = real_twiddle * odd;
  const Complex low = even + odd, high = even - odd;
  return {low.re * low.re + low.im * low.im, high.re * high.re + high.im * high.im};
}

// max(value, floor) that keeps a NaN (fmax would return the floor): NaN samples give NaN features,
// as torchaudio's and the torch path's clamp_min do, instead of a silent log floor.
FBANK_HD double at_least(double value, double floor) { return value < floor ? floor : value; }
FBANK_HD float at_least(float value, float floor) { return value < floor ? floor : value; }
// Float features take a float log (a double one costs tens of float64 instructions, four a lane
// per frame), except for a Mel energy past float's range (samples near 1e18), whose log is finite.
FBANK_HD float log_floored(double value, float) {
  if (value > 3.0e38) return static_cast<float>(log(value));
  return logf(at_least(static_cast<float>(value), static_cast<float>(kLogFloor)));
}
FBANK_HD double log_floored(double value, double) { return log(at_least(value, kLogFloor)); }

// The options and tables of one call. Tables are built on the host by kernels/fbank.py.
struct FrameConfig {
  int window_size;    // W samples per frame
  int padded_size;    // P, a power of two >= W; the complex FFT has P/2 points
  int64_t window_shift;
  int64_t reflect_pad;  // samples mirrored before the clip when !snip_edges (negative: skipped)
  bool snip_edges, remove_dc_offset, raw_energy, use_energy, htk_compat, use_log_fbank, use_power;
  bool fast_path;  // frames that allow it take compute_frame_512 (false: the general pipeline only, for timing it)
  double preemphasis_coefficient;
  double energy_floor;
  int num_mel_bins;
  int mel_width;                  // rows of mel_weights: the longest run of weights of any Mel bin
  const double* window;           // [W], 16-byte aligned: read in pairs
  const Complex* fft_twiddles;    // [P/2]  the FFT's twiddles pass by pass (fft_passes); the first pass's rows unused
  const Complex* real_twiddles;   // [P/2]  exp(-2 pi i k / P)
  const int* mel_start;           // [num_mel_bins]
  const int* mel_len;             // [num_mel_bins]
  const float* mel_weights;       // [mel_width, num_mel_bins]: column m holds bin m's run, zero past its
                                  // mel_len (bin-major, a warp's lanes, one bin each, load one row)
};

// The one place the call's options and table pointers become a FrameConfig (launcher and harness).
inline FrameConfig make_frame_config(int window_size, int padded_size, int64_t window_shift, int64_t reflect_pad,
                               int snip_edges, int remove_dc_offset, double preemphasis_coefficient,
                               int raw_energy, double energy_floor, int use_energy, int htk_compat,
                               int use_log_fbank, int use_power, int num_mel_bins, int mel_width,
                               const double* window, const double* fft_twiddles, const double* real_twiddles,
                               const int* mel_start, const int* mel_len, const float* mel_weights,
                               bool fast_path) {
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
  c.fast_path = fast_path;
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

// Powers of two that take a frame's power spectrum (or magnitudes) to the values stored in shared
// memory and back. `bound`: P times the windowed energy, which no bin's power exceeds. Float
// storage puts the bound at 2^100; double storage and a bound that is zero or not finite (a NaN or
// Inf sample: the features are NaN either way) keep the values as they are.
struct PowerScale {
  double to_stored, from_stored;
};
template <class scalar_t>
FBANK_HD PowerScale power_scale(double bound, bool use_power) {
  if (sizeof(scalar_t) == sizeof(double) || !(bound > 0.0 && bound < INFINITY)) return {1.0, 1.0};
  int exponent;
  frexp(use_power ? bound : sqrt(bound), &exponent);  // the largest stored value < 2^exponent
  return {ldexp(1.0, 100 - exponent), ldexp(1.0, exponent - 100)};
}

// Sample j of a frame whose first sample is clip sample `first`, reflected at the clip's ends
// unless edges are snipped (snipped frames lie inside the clip).
template <class scalar_t>
FBANK_HD double frame_sample(const FrameConfig& c, const scalar_t* clip, int64_t length, int64_t first, int j) {
  return static_cast<double>(clip[c.snip_edges ? first + j : reflect(first + j, length)]);
}

// Two consecutive samples, read in one load.
template <class T>
struct alignas(2 * sizeof(T)) SamplePair {
  T even, odd;
};

// Whether a frame lies inside its clip: nothing reflected (always so for snipped edges).
FBANK_HD bool frame_inside(const FrameConfig& c, int64_t length, int64_t first) {
  return first >= 0 && first + c.window_size <= length;
}

// Whether a frame starts on a pair's alignment, so that samples 2m and 2m + 1 are one SamplePair load.
template <class scalar_t>
FBANK_HD bool pair_aligned(const scalar_t* clip, int64_t first) {
  return reinterpret_cast<uintptr_t>(clip + first) % sizeof(SamplePair<scalar_t>) == 0;
}

// Whether a frame's samples 2m and 2m + 1 may be read as one SamplePair: inside and aligned.
template <class scalar_t>
FBANK_HD bool reads_sample_pairs(const FrameConfig& c, const scalar_t* clip, int64_t length, int64_t first) {
  return frame_inside(c, length, first) && pair_aligned(clip, first);
}

// The FFT input z[m] = y[2m] + i y[2m+1] of Kaldi's frame y = window * (x - c * x_prev), x the
// samples less their mean and x_prev[0] = x[0], zero past the window. Adds the two samples'
// x^2 to raw_energy and y^2 to windowed_energy. `sample_pairs`: reads_sample_pairs' answer.
template <class scalar_t>
FBANK_HD Complex windowed_pair(const FrameConfig& c, const scalar_t* clip, int64_t length, int64_t first,
                               bool sample_pairs, double mean, int m, double& raw_energy,
                               double& windowed_energy) {
  const int j = 2 * m;
  if (j >= c.window_size) return {0.0, 0.0};
  // window[j] and window[j + 1] in one 16-byte load, where both exist; the samples too, where the
  // frame allows.
  const bool pair = j + 1 < c.window_size;
  const Complex window = pair ? reinterpret_cast<const Complex*>(c.window)[m] : Complex{c.window[j], 0.0};
  double x0, x1 = 0.0;
  if (pair && sample_pairs) {
    const SamplePair<scalar_t> samples = *reinterpret_cast<const SamplePair<scalar_t>*>(clip + first + j);
    x0 = static_cast<double>(samples.even) - mean;
    x1 = static_cast<double>(samples.odd) - mean;
  } else {
    x0 = frame_sample(c, clip, length, first, j) - mean;
    if (pair) x1 = frame_sample(c, clip, length, first, j + 1) - mean;
  }
  // Without pre-emphasis the previous sample is neither read nor multiplied (0 * Inf would turn an
  // Inf sample's energy into NaN where torchaudio keeps Inf).
  const bool emphasis = c.preemphasis_coefficient != 0.0;
  const double previous = !emphasis ? 0.0 : j > 0 ? frame_sample(c, clip, length, first, j - 1) - mean : x0;
  const double y0 = window.re * (emphasis ? x0 - c.preemphasis_coefficient * previous : x0);
  raw_energy += x0 * x0;
  windowed_energy += y0 * y0;
  if (!pair) return {y0, 0.0};
  const double y1 = window.im * (emphasis ? x1 - c.preemphasis_coefficient * x0 : x1);
  raw_energy += x1 * x1;
  windowed_energy += y1 * y1;
  return {y0, y1};
}

// The FFT's first radix-R pass (sub-transforms of length 1, no twiddles) computed from the clip:
// each lane builds its R inputs in registers and writes the pass's outputs to dst (padded
// layout). The frame itself never goes through shared memory.
FBANK_HD_TEMPLATE
template <int R, class Team, class scalar_t>
FBANK_HD void first_pass_from_clip(const Team& team, const FrameConfig& c, const scalar_t* clip, int64_t length,
                                   int64_t first, double mean, Complex* dst, double& raw_energy,
                                   double& windowed_energy) {
  const int items = c.padded_size / 2 / R;
  const bool sample_pairs = reads_sample_pairs(c, clip, length, first);
  for (int j = team.rank(); j < items; j += team.size()) {
    Complex v[R];
    for (int r = 0; r < R; ++r) {
      v[r] = windowed_pair(c, clip, length, first, sample_pairs, mean, j + r * items, raw_energy, windowed_energy);
    }
    dft<R>(v);
    for (int r = 0; r < R; ++r) dst[padded_index(j * R + r)] = v[r];
  }
}

// The power spectrum (or magnitudes) of the transformed frame `spectrum` (n complex points, the
// real FFT of 2n samples) into `power` [n], in the features' type and scaled by `scale` (bin n,
// Nyquist, is dropped as Kaldi drops it). Bins k and n - k together (k = 0 and k = n / 2 are their
// own partners). Float features take real_spectrum_powers without the halves: the exact 1/4 (1/2
// for magnitudes) joins the scale's power of two.
FBANK_HD_TEMPLATE
template <class Team, class scalar_t>
FBANK_HD void store_powers(const Team& team, const FrameConfig& c, const Complex* spectrum, int n, PowerScale scale,
                           scalar_t* power) {
  constexpr bool halved = sizeof(scalar_t) == sizeof(double);  // double features keep the halves
  const double factor = halved ? scale.to_stored : scale.to_stored * (c.use_power ? 0.25 : 0.5);
  for (int k = team.rank(); k <= n / 2; k += team.size()) {
    const PowerPair p = real_spectrum_powers<halved>(spectrum, n, k, c.real_twiddles[k]);
    power[k] = static_cast<scalar_t>((c.use_power ? p.low : sqrt(p.low)) * factor);
    if (k > 0 && 2 * k < n) power[n - k] = static_cast<scalar_t>((c.use_power ? p.high : sqrt(p.high)) * factor);
  }
}

// What the Mel sums accumulate in: float features in float, double ones in double. The terms are
// positive (weights times powers), so a float sum of a bin's at most a few dozen terms is within
// 1e-6 of the exact sum (1e-6 on the log), where converting each term to double cost two of the
// slowest conversions a term; the cancellation that needs double happens before, in the FFT.
template <class scalar_t>
struct MelSum {
  using type = double;
};
template <>
struct MelSum<float> {
  using type = float;
};

// The Mel features (and the energy) of one frame from its stored power spectrum `power`, into
// out[0..num_mel_bins + use_energy): one Mel bin a lane at a time.
FBANK_HD_TEMPLATE
template <class Team, class scalar_t>
FBANK_HD void write_features(const Team& team, const FrameConfig& c, const scalar_t* power, PowerScale scale,
                             double energy, scalar_t* out) {
  using sum_t = typename MelSum<scalar_t>::type;
  const int mel_column = c.use_energy && !c.htk_compat ? 1 : 0;
  for (int m = team.rank(); m < c.num_mel_bins; m += team.size()) {
    const scalar_t* bins = power + c.mel_start[m];
    sum_t e = 0;
    for (int i = 0; i < c.mel_len[m]; ++i) {
      e += static_cast<sum_t>(c.mel_weights[static_cast<int64_t>(i) * c.num_mel_bins + m]) * static_cast<sum_t>(bins[i]);
    }
    const double energy_m = static_cast<double>(e) * scale.from_stored;
    out[mel_column + m] = c.use_log_fbank ? log_floored(energy_m, scalar_t()) : static_cast<scalar_t>(energy_m);
  }
  if (c.use_energy && team.rank() == 0) {
    double log_energy = log(at_least(energy, kLogFloor));
    if (c.energy_floor > 0.0) log_energy = at_least(log_energy, log(c.energy_floor));
    out[c.htk_compat ? c.num_mel_bins : 0] = static_cast<scalar_t>(log_energy);
  }
}

// ---- The common frame, specialised: 512-point FFT, whole frame inside the clip, 32 lanes -----------
//
// compute_frame serves every option and frame; for the frames most calls are made of (a 25 ms
// window at 16 kHz: 400 samples padded to 512, inside its clip) it spends most of its instructions
// on what it cannot know at compile time: lane-strided loops of runtime length, reflected and
// 64-bit sample indices, per-sample branches, the samples read and converted to double three times
// (the mean's pass, the sample, its pre-emphasis neighbour). On the H200 it issued about 2,400
// warp instructions a frame (Nsight Compute, 2026-11-27: 0.58 issued a cycle at 4.9 warps a
// scheduler). Here every size is a constant: each lane reads its 16 samples once (as 8 pairs, the
// pairs the FFT's first radix-8 pass takes from it), converts them once, sums them for the mean,
// takes each pair's pre-emphasis neighbour from the next lane down by a shuffle, and runs the
// three Stockham passes (8, 8, 4) at constant sizes. Same arithmetic as compute_frame, term for
// term, up to the order of the mean's and the energies' sums.
constexpr int kFastLanes = 32;
constexpr int kFastPoints = 256;  // complex FFT points: a 512-sample padded frame

// Whether frame samples [first, first + W) take compute_frame_512: the whole padded frame is 512
// samples, the window an even number of them (whole pairs), the frame inside its clip, and the
// team a warp of 32. (A frame off a pair's alignment, as every other clip of an odd-length batch
// starts, reads its samples one at a time.)
FBANK_HD_TEMPLATE
template <class Team>
FBANK_HD bool fast_frame_applies(const Team& team, const FrameConfig& c, int64_t length, int64_t first) {
  return c.fast_path && team.size() == kFastLanes && c.padded_size == 2 * kFastPoints && c.window_size % 2 == 0 &&
         frame_inside(c, length, first);
}

// compute_frame_512's FFT input v[r] = y[2m] + i y[2m + 1] of lane l's pairs m = l + 32 r, from
// its samples x0[r], x1[r] (zero past the window): y = window * (x - coefficient * x_prev), x less
// the mean. x_prev of sample 2m + 1 is 2m, in the lane; of 2m it is 2m - 1, the odd sample of lane
// l - 1, which a shuffle brings (lane 31 sends its previous r's instead, lane 0's neighbour; pair 0
// is its own neighbour, as Kaldi's first sample). kEmphasis: the coefficient is not zero (without
// it no neighbour is read: 0 * Inf would be NaN). Adds y^2 to windowed_energy and, when `raw`,
// (x - mean)^2 to raw_energy. Every branch is uniform across the warp; pairs past the window get
// a zero window and no neighbour, so they add nothing.
FBANK_HD_TEMPLATE
template <bool kEmphasis, class Team>
FBANK_HD void windowed_pairs_512(const Team& team, const FrameConfig& c, double mean, const double* x0,
                                 const double* x1, Complex* v, bool raw, double& raw_energy,
                                 double& windowed_energy) {
  constexpr int R = 8, L = kFastLanes;
  const int lane = team.rank(), below_lane = (lane + L - 1) % L;
  const auto* window = reinterpret_cast<const Complex*>(c.window);
  const double coefficient = c.preemphasis_coefficient;
  double last_odd = 0.0;  // this lane's odd sample (less the mean) of the previous r
FBANK_UNROLL
  for (int r = 0; r < R; ++r) v[r] = Complex{0.0, 0.0};
FBANK_UNROLL
  for (int r = 0; r < R; ++r) {
    if (2 * L * r >= c.window_size) break;  // no lane has a sample here, nor at any later r
    const int m = lane + L * r;
    const bool inside = 2 * m < c.window_size;
    // Past the window: zero, not -mean (a mean that overflowed to Inf would give 0 * Inf = NaN).
    const double d0 = inside ? x0[r] - mean : 0.0, d1 = inside ? x1[r] - mean : 0.0;
    const Complex w = inside ? window[m] : Complex{0.0, 0.0};
    double e0 = d0, e1 = d1;
    if (kEmphasis) {
      const double below = team.shuffle(lane == L - 1 ? last_odd : d1, below_lane);
      const double previous = !inside ? 0.0 : lane == 0 && r == 0 ? d0 : below;
      last_odd = d1;
      e0 = d0 - coefficient * previous;
      e1 = d1 - coefficient * d0;
    }
    const double y0 = w.re * e0, y1 = w.im * e1;
    windowed_energy += y0 * y0 + y1 * y1;
    if (raw && inside) raw_energy += d0 * d0 + d1 * d1;
    v[r] = Complex{y0, y1};
  }
}

FBANK_HD_TEMPLATE
template <class Team, class scalar_t>
FBANK_HD void compute_frame_512(const Team& team, const FrameConfig& c, const scalar_t* clip, int64_t first,
                                double* a, double* b, scalar_t* out) {
  constexpr int R = 8, L = kFastLanes;
  const int lane = team.rank(), W = c.window_size;
  const scalar_t* samples = clip + first;
  const auto* pairs = reinterpret_cast<const SamplePair<scalar_t>*>(samples);
  const bool aligned = pair_aligned(clip, first);  // the same for every lane

  // Lane l holds sample pairs m = l + 32 r (r < 8): samples 2m and 2m + 1, zero past the window.
  double x0[R], x1[R], sum = 0.0;
FBANK_UNROLL
  for (int r = 0; r < R; ++r) {
    const int m = lane + L * r;
    x0[r] = x1[r] = 0.0;
    if (2 * m < W) {
      if (aligned) {
        const SamplePair<scalar_t> pair = pairs[m];
        x0[r] = static_cast<double>(pair.even);
        x1[r] = static_cast<double>(pair.odd);
      } else {
        x0[r] = static_cast<double>(samples[2 * m]);
        x1[r] = static_cast<double>(samples[2 * m + 1]);
      }
      sum += x0[r] + x1[r];
    }
  }
  const double mean = c.remove_dc_offset ? team.sum(sum) / W : 0.0;

  const bool raw = c.use_energy && c.raw_energy;
  double raw_energy = 0.0, windowed_energy = 0.0;
  Complex v[R];
  if (c.preemphasis_coefficient != 0.0) {
    windowed_pairs_512<true>(team, c, mean, x0, x1, v, raw, raw_energy, windowed_energy);
  } else {
    windowed_pairs_512<false>(team, c, mean, x0, x1, v, raw, raw_energy, windowed_energy);
  }
  const double windowed_total = team.sum(windowed_energy);
  const double energy = raw ? team.sum(raw_energy) : windowed_total;

  // The three Stockham passes of fft_passes for n = 256 (radix 8 at span 1, 8 at 8, 4 at 64): the
  // first from the registers, the others stockham_pass's with every size a constant.
  Complex* A = reinterpret_cast<Complex*>(a);
  Complex* B = reinterpret_cast<Complex*>(b);
  dft8(v);
FBANK_UNROLL
  for (int r = 0; r < R; ++r) A[padded_index(R * lane + r)] = v[r];
  team.sync();
  stockham_pass<8>(team, A, B, kFastPoints, 8, c.fft_twiddles);
  team.sync();
  stockham_pass<4>(team, B, A, kFastPoints, 64, c.fft_twiddles);
  team.sync();

  // Power spectrum into B, as compute_frame stores it; then the Mel sums.
  const PowerScale scale = power_scale<scalar_t>(2 * kFastPoints * windowed_total, c.use_power);
  scalar_t* power = reinterpret_cast<scalar_t*>(b);
  store_powers(team, c, A, kFastPoints, scale, power);
  team.sync();
  write_features(team, c, power, scale, energy, out);
}

// Features of frame `frame` of one clip into out[0..num_mel_bins + use_energy).
// a and b: scratch_doubles(P) doubles each (16-byte aligned), private to the team.
FBANK_HD_TEMPLATE
template <class Team, class scalar_t>
FBANK_HD void compute_frame(const Team& team, const FrameConfig& c, const scalar_t* clip, int64_t length,
                            int64_t frame, double* a, double* b, scalar_t* out) {
  const int num_features = c.num_mel_bins + (c.use_energy ? 1 : 0);
  if (frame >= frames_of_clip(c, length)) {
    for (int m = team.rank(); m < num_features; m += team.size()) out[m] = scalar_t(0);
    return;
  }
  const int W = c.window_size, n = c.padded_size / 2;
  const int64_t first = frame * c.window_shift - c.reflect_pad;
  if (fast_frame_applies(team, c, length, first)) {
    compute_frame_512(team, c, clip, first, a, b, out);
    return;
  }

  double mean = 0.0;
  if (c.remove_dc_offset) {
    double sum = 0.0;
    for (int j = team.rank(); j < W; j += team.size()) sum += frame_sample(c, clip, length, first, j);
    mean = team.sum(sum) / W;
  }

  double raw_energy = 0.0, windowed_energy = 0.0;
  Complex* z = reinterpret_cast<Complex*>(a);
  const int radix = pass_radix(n, 1);
  if (radix == 8) {
    first_pass_from_clip<8>(team, c, clip, length, first, mean, z, raw_energy, windowed_energy);
  } else if (radix == 4) {
    first_pass_from_clip<4>(team, c, clip, length, first, mean, z, raw_energy, windowed_energy);
  } else if (radix == 2) {
    first_pass_from_clip<2>(team, c, clip, length, first, mean, z, raw_energy, windowed_energy);
  } else {
    first_pass_from_clip<1>(team, c, clip, length, first, mean, z, raw_energy, windowed_energy);
  }
  const double windowed_total = team.sum(windowed_energy);
  const double energy = c.use_energy && c.raw_energy ? team.sum(raw_energy) : windowed_total;
  team.sync();

  Complex* spectrum = fft_passes(team, z, reinterpret_cast<Complex*>(b), n, radix, c.fft_twiddles);
  // The power spectrum goes to shared memory in the features' type: float for float clips halves
  // the Mel stage's traffic. Float's range is then the question, so float values are stored times
  // a power of two (exact): by Parseval no bin's power exceeds P times the windowed energy, and the
  // factor puts that bound at 2^100, so the largest bin cannot overflow and bins 68 decades below
  // it stay normal floats (far below double rounding's noise, 1e-32 of the largest). Double
  // values are stored as they are. The Mel sums run in double and undo the factor.
  const PowerScale scale = power_scale<scalar_t>(c.padded_size * windowed_total, c.use_power);
  scalar_t* power = reinterpret_cast<scalar_t*>(reinterpret_cast<double*>(spectrum) == a ? b : a);
  store_powers(team, c, spectrum, n, scale, power);
  team.sync();

  write_features(team, c, power, scale, energy, out);
}

// The team of one that runs the pipeline serially on the host.
struct SerialTeam {
  FBANK_HD int rank() const { return 0; }
  FBANK_HD int size() const { return 1; }
  FBANK_HD void sync() const {}
  FBANK_HD double sum(double v) const { return v; }
  FBANK_HD double shuffle(double v, int) const { return v; }
};

}  // namespace fbank
