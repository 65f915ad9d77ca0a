// Host build of the kernel's per-frame arithmetic (fbank_frame.cuh) for tests without a GPU.
//
// tests/test_fbank.py compiles this file with g++ into a shared library, calls it through ctypes
// with the tables kernels/fbank.py builds for the kernel, and compares the result with torchaudio.
// The loop over (clip, frame) is the kernel's grid; SerialTeam stands in for the warp, and
// ThreadTeam runs the warp's lanes as real threads.
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "fbank_frame.cuh"

namespace {

template <class scalar_t>
void run(const scalar_t* waveforms, int64_t num_clips, int64_t num_samples, const int64_t* lengths,
         int64_t num_frames, fbank::FrameConfig config, scalar_t* out) {
  const int num_features = config.num_mel_bins + (config.use_energy ? 1 : 0);
  const int buffer = fbank::scratch_doubles(config.padded_size);
  std::vector<double> scratch(2 * static_cast<size_t>(buffer) + 2);
  double* a = scratch.data() + (reinterpret_cast<uintptr_t>(scratch.data()) % 16 ? 1 : 0);
  for (int64_t clip = 0; clip < num_clips; ++clip) {
    for (int64_t frame = 0; frame < num_frames; ++frame) {
      fbank::compute_frame(fbank::SerialTeam{}, config, waveforms + clip * num_samples, lengths[clip], frame, a,
                           a + buffer, out + (clip * num_frames + frame) * num_features);
    }
  }
}

// std::barrier is C++20; the sources build as C++17, like the extension.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
    } else {
      released_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const int count_;
  int arrived_ = 0;
  long generation_ = 0;
};

// `lanes` threads standing in for the warp's lanes: the kernel's lane-strided loops, syncs and sums
// with real concurrency, so a missing sync or a lane-indexing slip shows up without a GPU.
class ThreadTeam {
 public:
  ThreadTeam(int lane, int lanes, Barrier& barrier, double* partial)
      : lane_(lane), lanes_(lanes), barrier_(&barrier), partial_(partial) {}
  int rank() const { return lane_; }
  int size() const { return lanes_; }
  void sync() const { barrier_->arrive_and_wait(); }
  double sum(double v) const {
    partial_[lane_] = v;
    sync();
    double total = 0.0;
    for (int i = 0; i < lanes_; ++i) total += partial_[i];
    sync();  // no lane overwrites its partial before every lane has read them all
    return total;
  }
  double shuffle(double v, int source_lane) const {
    partial_[lane_] = v;
    sync();
    const double got = partial_[source_lane];
    sync();
    return got;
  }

 private:
  int lane_, lanes_;
  Barrier* barrier_;
  double* partial_;
};

// One warp of the kernel walking every (clip, frame), as the kernel's clip loop does for its frame.
// `fast_frames` (when not null) gets the number of frames that took compute_frame_512.
template <class scalar_t>
void run_lanes(const scalar_t* waveforms, int64_t num_clips, int64_t num_samples, const int64_t* lengths,
               int64_t num_frames, fbank::FrameConfig config, scalar_t* out, int lanes, int64_t* fast_frames) {
  const int num_features = config.num_mel_bins + (config.use_energy ? 1 : 0);
  const int buffer = fbank::scratch_doubles(config.padded_size);
  std::vector<double> scratch(2 * static_cast<size_t>(buffer) + 2);
  double* a = scratch.data() + (reinterpret_cast<uintptr_t>(scratch.data()) % 16 ? 1 : 0);
  Barrier barrier(lanes);
  std::vector<double> partial(lanes);
  std::vector<std::thread> threads;
  for (int lane = 0; lane < lanes; ++lane) {
    threads.emplace_back([&, lane] {
      const ThreadTeam team(lane, lanes, barrier, partial.data());
      for (int64_t clip = 0; clip < num_clips; ++clip) {
        for (int64_t frame = 0; frame < num_frames; ++frame) {
          const scalar_t* samples = waveforms + clip * num_samples;
          if (fast_frames != nullptr && lane == 0 && frame < fbank::frames_of_clip(config, lengths[clip]) &&
              fbank::fast_frame_applies(team, config, lengths[clip], frame * config.window_shift - config.reflect_pad)) {
            ++*fast_frames;
          }
          fbank::compute_frame(team, config, samples, lengths[clip], frame, a, a + buffer,
                               out + (clip * num_frames + frame) * num_features);
          team.sync();  // the kernel's __syncwarp before the scratch is reused
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
}

}  // namespace

#define FBANK_HOST_ARGS                                                                                      \
  int64_t num_clips, int64_t num_samples, const int64_t *lengths, int64_t num_frames, int window_size,       \
      int padded_size, int64_t window_shift, int64_t reflect_pad, int snip_edges, int remove_dc_offset,      \
      double preemphasis_coefficient, int raw_energy, double energy_floor, int use_energy, int htk_compat,   \
      int use_log_fbank, int use_power, int num_mel_bins, int mel_width, const double *window,               \
      const double *fft_twiddles, const double *real_twiddles, const int *mel_start, const int *mel_len,     \
      const float *mel_weights, int fast_path
#define FBANK_HOST_CONFIG                                                                                    \
  fbank::make_frame_config(window_size, padded_size, window_shift, reflect_pad, snip_edges, remove_dc_offset,            \
              preemphasis_coefficient, raw_energy, energy_floor, use_energy, htk_compat, use_log_fbank,     \
              use_power, num_mel_bins, mel_width, window, fft_twiddles, real_twiddles, mel_start, mel_len,   \
              mel_weights, fast_path)

extern "C" void fbank_host_float(const float* waveforms, float* out, FBANK_HOST_ARGS) {
  run(waveforms, num_clips, num_samples, lengths, num_frames, FBANK_HOST_CONFIG, out);
}

extern "C" void fbank_host_double(const double* waveforms, double* out, FBANK_HOST_ARGS) {
  run(waveforms, num_clips, num_samples, lengths, num_frames, FBANK_HOST_CONFIG, out);
}

extern "C" void fbank_host_lanes_float(const float* waveforms, float* out, int lanes, int64_t* fast_frames,
                                       FBANK_HOST_ARGS) {
  run_lanes(waveforms, num_clips, num_samples, lengths, num_frames, FBANK_HOST_CONFIG, out, lanes, fast_frames);
}

extern "C" void fbank_host_lanes_double(const double* waveforms, double* out, int lanes, int64_t* fast_frames,
                                        FBANK_HOST_ARGS) {
  run_lanes(waveforms, num_clips, num_samples, lengths, num_frames, FBANK_HOST_CONFIG, out, lanes, fast_frames);
}

// The bare complex FFT of data[0..n) in place, to test the Stockham passes against numpy for every
// power of two: the data go into the padded layout and come back out of it.
extern "C" void fft_host(double* data, int n, const double* twiddles) {
  auto* values = reinterpret_cast<fbank::Complex*>(data);
  std::vector<fbank::Complex> a(fbank::padded_length(n)), b(fbank::padded_length(n));
  for (int k = 0; k < n; ++k) a[fbank::padded_index(k)] = values[k];
  const fbank::Complex* result = fbank::fft_passes(fbank::SerialTeam{}, a.data(), b.data(), n, 1,
                                                   reinterpret_cast<const fbank::Complex*>(twiddles));
  for (int k = 0; k < n; ++k) values[k] = result[fbank::padded_index(k)];
}
