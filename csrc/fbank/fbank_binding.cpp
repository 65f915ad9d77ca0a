// Python binding of the fbank launcher (fbank.cu); kernels/fbank.py wraps it as audiomae::fbank_cuda.
#include <torch/extension.h>

at::Tensor fbank_cuda(const at::Tensor& waveforms, const at::Tensor& lengths, int64_t num_frames,
                      const at::Tensor& window, const at::Tensor& fft_twiddles, const at::Tensor& real_twiddles,
                      const at::Tensor& mel_start, const at::Tensor& mel_len, const at::Tensor& mel_weights,
                      int64_t window_shift, int64_t reflect_pad, bool snip_edges, bool remove_dc_offset,
                      double preemphasis_coefficient, bool raw_energy, double energy_floor, bool use_energy,
                      bool htk_compat, bool use_log_fbank, bool use_power, int64_t launch_shape,
                      bool fast_path);
std::string fbank_cuda_unavailable(int64_t device_index);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fbank_cuda", &fbank_cuda, "Batched Kaldi fbank features [B, frames, bins] of waveforms [B, N] (CUDA)");
  m.def("fbank_cuda_unavailable", &fbank_cuda_unavailable,
        "Why the kernel cannot run on the given CUDA device (no loadable image), or an empty string");
}
