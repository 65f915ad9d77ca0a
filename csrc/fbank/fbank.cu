// Batched Kaldi fbank in one launch: one warp per frame, one block per (clip, group of frames).
//
// Each warp reads its frame's samples from the clip (a first pass for the DC offset, a second that
// pre-emphasises and windows them in doubles straight into the FFT's first radix-8 pass, in
// registers), runs the other FFT passes in shared memory (radix-8/4/2 Stockham passes, registers
// in between), takes the power spectrum two bins at a time and sums it through the sparse Mel
// table straight into the output row. Device memory sees the samples once and the features once;
// the frames and spectra live only in registers and shared memory. The arithmetic is
// fbank_frame.cuh's.
//
// Shared memory and L1 traffic, not arithmetic, bound this kernel. A model of one warp's accesses
// for a 512-point frame with 128 Mel bins (python -m benches.fbank_traffic_model: bank conflicts on
// shared memory, 128-byte lines on global loads) counts 1177 wavefronts for the kernel measured at
// 1.34 ms on the H100 (2026-11-27) and 415 for this one. What changed: the frame no longer goes
// through shared memory; the FFT buffers are padded against the first pass's 32-way bank conflicts
// (padded_index); the Mel weights are bin-major float32 (coalesced, and float32 is what torchaudio
// builds them in); the twiddles are stored pass by pass (consecutive per lane); the window, and the
// samples of a frame inside its clip, are read in pairs; the power spectrum is taken two bins per
// load and kept in the features' type (float32 for float32 clips), scaled to fit.
//
// Frames of a 512-point padded window that lie inside their clip (nearly all of them at 25 ms and
// 16 kHz) take fbank_frame.cuh's compute_frame_512 instead of the general compute_frame: the
// same arithmetic with every size a constant, each sample read and converted once, pre-emphasis
// neighbours by shuffle (see there). FrameConfig::fast_path = false sends every frame to the
// general pipeline (kernels.fbank.forced_general_path, for the benchmark's comparison).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <string>

#include "fbank_frame.cuh"

namespace fbank {
namespace {

constexpr int kWarp = 32;
// Bytes per block, at most: a 4096-point frame alone needs 72 KiB (two padded buffers of 2304
// complex doubles); eight 512-point frames need 8 x 9 KiB. A GPU that allows a block less (sm_75:
// 64 KiB) gets fewer frames per block, and no 4096-point frames (kernels/fbank.py sends those to
// the torch path under "auto").
constexpr int kSharedBudget = 80 * 1024;

// Launch shapes: warps (frames) per block, and the blocks per SM that __launch_bounds__ asks the
// register allocator to fit. Python picks one (kernels/fbank.py, DEFAULT_LAUNCH_SHAPE, timed on
// the GPU by benches/bench_fbank.py). Shape 0 asks for two blocks, 16 warps, an SM: that caps it
// at 128 registers a thread, which it uses without spilling; float64 clips always take it. Shape 1
// (four frames a block, five blocks, 96 registers) is float32's default: on an H200 it ran 13 %
// faster than shape 0. 9 KiB of shared memory a 512-point frame caps every shape at 24 warps.
struct LaunchShape {
  int frames_per_block, min_blocks_per_sm;
};
// (Shapes of four frames at seven blocks and two at fourteen, 72 registers, read 6 % slower than
// shape 1 on the H200 on 2026-11-27 and spill about 250 bytes with compute_frame_512: dropped.)
constexpr LaunchShape kLaunchShapes[] = {{8, 2}, {4, 5}, {8, 3}};
constexpr int kNumLaunchShapes = sizeof(kLaunchShapes) / sizeof(kLaunchShapes[0]);

struct WarpTeam {
  int lane;
  __device__ int rank() const { return lane; }
  __device__ int size() const { return kWarp; }
  __device__ void sync() const { __syncwarp(); }
  __device__ double sum(double v) const {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
  }
  __device__ double shuffle(double v, int source_lane) const { return __shfl_sync(0xffffffffu, v, source_lane); }
};

template <class scalar_t, int kShape>
__global__ void __launch_bounds__(kWarp * kLaunchShapes[kShape].frames_per_block,
                                  kLaunchShapes[kShape].min_blocks_per_sm)
fbank_kernel(const scalar_t* __restrict__ waveforms, int64_t num_clips, int64_t num_samples,
                             const int64_t* __restrict__ lengths, int64_t num_frames, int num_features,
                             int frames_per_block, FrameConfig config, scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int warp = threadIdx.x / kWarp;
  const int64_t frame = static_cast<int64_t>(blockIdx.x) * frames_per_block + warp;
  if (frame >= num_frames) return;
  const int buffer = scratch_doubles(config.padded_size);
  double* a = reinterpret_cast<double*>(shared) + static_cast<int64_t>(warp) * 2 * buffer;
  double* b = a + buffer;
  const WarpTeam team{static_cast<int>(threadIdx.x % kWarp)};
  for (int64_t clip = blockIdx.y; clip < num_clips; clip += gridDim.y) {
    compute_frame(team, config, waveforms + clip * num_samples, lengths[clip], frame, a, b,
                  out + (clip * num_frames + frame) * num_features);
    __syncwarp();  // the next clip reuses a and b
  }
}

void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device,
                 bool read_in_pairs = false) {
  TORCH_CHECK(t.device() == device, "fbank_cuda: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "fbank_cuda: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fbank_cuda: ", name, " must be contiguous");
  // The window and the twiddles are read 16 bytes at a time (window pairs, complex twiddles).
  TORCH_CHECK(!read_in_pairs || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "fbank_cuda: ", name,
              " must be 16-byte aligned");
}

}  // namespace
}  // namespace fbank

// Why the kernel cannot run on CUDA device ``device_index`` ("" when it can): an extension built
// for other architectures (sm_90 plus PTX, say) imports anywhere but has no image an older GPU
// can load, and that should send "auto" to the torch path rather than fail at the launch.
std::string fbank_cuda_unavailable(int64_t device_index) {
  using namespace fbank;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  cudaFuncAttributes attributes;
  for (const void* kernel : {reinterpret_cast<const void*>(fbank_kernel<float, 0>),
                             reinterpret_cast<const void*>(fbank_kernel<double, 0>)}) {
    const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
    if (status != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it so that later launches do not report it
      return cudaGetErrorString(status);
    }
  }
  return "";
}

at::Tensor fbank_cuda(const at::Tensor& waveforms, const at::Tensor& lengths, int64_t num_frames,
                      const at::Tensor& window, const at::Tensor& fft_twiddles, const at::Tensor& real_twiddles,
                      const at::Tensor& mel_start, const at::Tensor& mel_len, const at::Tensor& mel_weights,
                      int64_t window_shift, int64_t reflect_pad, bool snip_edges, bool remove_dc_offset,
                      double preemphasis_coefficient, bool raw_energy, double energy_floor, bool use_energy,
                      bool htk_compat, bool use_log_fbank, bool use_power, int64_t launch_shape, bool fast_path) {
  using namespace fbank;
  TORCH_CHECK(launch_shape >= 0 && launch_shape < kNumLaunchShapes, "fbank_cuda: launch_shape must be in [0, ",
              kNumLaunchShapes, "), got ", launch_shape);
  TORCH_CHECK(launch_shape == 0 || waveforms.scalar_type() == at::kFloat,
              "fbank_cuda: float64 waveforms take launch shape 0 only, got ", launch_shape);
  TORCH_CHECK(waveforms.is_cuda(), "fbank_cuda: waveforms must be a CUDA tensor, got ", waveforms.device());
  TORCH_CHECK(waveforms.dim() == 2 && waveforms.is_contiguous(), "fbank_cuda: waveforms must be contiguous [B, N]");
  TORCH_CHECK(waveforms.scalar_type() == at::kFloat || waveforms.scalar_type() == at::kDouble,
              "fbank_cuda: waveforms must be float32 or float64, got ", waveforms.scalar_type());
  const at::Device device = waveforms.device();
  const int64_t num_clips = waveforms.size(0);
  check_table(lengths, "lengths", at::kLong, device);
  TORCH_CHECK(lengths.numel() == num_clips, "fbank_cuda: lengths must have one entry per clip");
  check_table(window, "window", at::kDouble, device, true);
  check_table(fft_twiddles, "fft_twiddles", at::kDouble, device, true);
  check_table(real_twiddles, "real_twiddles", at::kDouble, device, true);
  check_table(mel_start, "mel_start", at::kInt, device);
  check_table(mel_len, "mel_len", at::kInt, device);
  check_table(mel_weights, "mel_weights", at::kFloat, device);
  const int64_t half = fft_twiddles.size(0);
  TORCH_CHECK(half >= 1 && (half & (half - 1)) == 0 && 2 * half <= 4096,
              "fbank_cuda: the padded window must be a power of two <= 4096, got ", 2 * half);
  TORCH_CHECK(window.numel() <= 2 * half, "fbank_cuda: window longer than the padded window");
  TORCH_CHECK(real_twiddles.size(0) == half, "fbank_cuda: fft_twiddles and real_twiddles differ in length");
  TORCH_CHECK(mel_weights.dim() == 2 && mel_weights.size(1) == mel_start.numel() && mel_len.numel() == mel_start.numel(),
              "fbank_cuda: Mel tables disagree in size (mel_weights is [max(mel_len), num_mel_bins])");
  TORCH_CHECK(window_shift >= 1, "fbank_cuda: window_shift must be >= 1");

  const int num_mel_bins = static_cast<int>(mel_start.numel());
  const int num_features = num_mel_bins + (use_energy ? 1 : 0);
  at::Tensor out = at::empty({num_clips, num_frames, num_features}, waveforms.options());
  if (num_clips == 0 || num_frames == 0) return out;

  const FrameConfig config = make_frame_config(
      static_cast<int>(window.numel()), static_cast<int>(2 * half), window_shift, reflect_pad, snip_edges,
      remove_dc_offset, preemphasis_coefficient, raw_energy, energy_floor, use_energy, htk_compat, use_log_fbank,
      use_power, num_mel_bins, static_cast<int>(mel_weights.size(0)), window.data_ptr<double>(),
      fft_twiddles.data_ptr<double>(), real_twiddles.data_ptr<double>(), mel_start.data_ptr<int>(),
      mel_len.data_ptr<int>(), mel_weights.data_ptr<float>(), fast_path);

  const int frame_bytes = 2 * scratch_doubles(config.padded_size) * static_cast<int>(sizeof(double));
  int shared_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  const int budget = std::min(kSharedBudget, shared_limit);
  TORCH_CHECK(frame_bytes <= budget, "fbank_cuda: a ", config.padded_size, "-point frame needs ", frame_bytes,
              " bytes of shared memory, more than the ", budget, " a block may have on this GPU");
  const int frames_per_block = std::min(kLaunchShapes[launch_shape].frames_per_block, budget / frame_bytes);
  const int shared_bytes = frames_per_block * frame_bytes;
  const dim3 grid(static_cast<unsigned>((num_frames + frames_per_block - 1) / frames_per_block),
                  static_cast<unsigned>(std::min<int64_t>(num_clips, 65535)));
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto kernel, auto* samples, auto* features) {
    if (shared_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
    }
    kernel<<<grid, kWarp * frames_per_block, shared_bytes, stream>>>(
        samples, num_clips, waveforms.size(1), lengths.data_ptr<int64_t>(), num_frames, num_features,
        frames_per_block, config, features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (waveforms.scalar_type() == at::kDouble) {
    launch(fbank_kernel<double, 0>, waveforms.data_ptr<double>(), out.data_ptr<double>());
  } else {
    const float* samples = waveforms.data_ptr<float>();
    float* features = out.data_ptr<float>();
    switch (launch_shape) {
      case 0: launch(fbank_kernel<float, 0>, samples, features); break;
      case 1: launch(fbank_kernel<float, 1>, samples, features); break;
      default: launch(fbank_kernel<float, 2>, samples, features); break;
    }
  }
  return out;
}
