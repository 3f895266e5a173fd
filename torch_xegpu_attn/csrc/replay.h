// Signatures of calls and the knobs a replay honours, shared by the op's own
// replay of CPU calls (op.cpp) and by device launchers that replay the calls
// they recorded (cuda_launcher.cpp).
//
// A signature is everything the frontend's checks and its mapping to
// canonical operands read: per tensor its device, dtype, rank, sizes and
// strides, then the flags.  Two calls with one signature get the same spec,
// kernel, operand descriptors (but for base addresses) and grids.
//
// A device launcher is a separate extension (built on the machine that has
// the device).  It hands op.cpp one function of type DeviceReplay, wrapped in
// a PyCapsule named kDeviceReplayCapsule; op.cpp calls it for tensors of that
// device type before it falls back to the Python frontend.

#pragma once

#include <torch/extension.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace xattn {

// The op's arguments, as the dispatcher or Python gave them.
struct Call {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor* mask;  // null: no mask
  double dropout_p;
  bool is_causal;
  std::optional<double> scale;
  bool enable_gqa;
};

// A device launcher's replay: true with `*out` set when it recorded the
// call's signature and ran the kernel, false to send the call to the checked
// path.  Must not throw for a call it did not record.
using DeviceReplay = bool (*)(const Call& call, at::Tensor* out);
constexpr const char* kDeviceReplayCapsule = "torch_xegpu_attn.device_replay";

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& words) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
    for (int64_t w : words) h = (h ^ static_cast<uint64_t>(w)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

inline int64_t bits(double x) {
  int64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// Appends what the checks and the mapping read of `t`; false when `t` is not a
// plain dense tensor (such calls always take the checked path).
inline bool encode(const at::Tensor& t, std::vector<int64_t>& key) {
  if (!t.defined() || t.layout() != c10::kStrided || t.is_neg() || t.is_conj() || t.is_nested() ||
      !t.has_storage()) {
    return false;
  }
  const int64_t rank = t.dim();
  const c10::Device device = t.device();
  key.push_back(static_cast<int64_t>(t.scalar_type()) | rank << 8 | static_cast<int64_t>(device.type()) << 16 |
                static_cast<int64_t>(device.index() + 1) << 24);
  key.insert(key.end(), t.sizes().begin(), t.sizes().end());
  key.insert(key.end(), t.strides().begin(), t.strides().end());
  return true;
}

inline bool make_key(const Call& call, std::vector<int64_t>& key) {
  key.reserve(64);
  if (!encode(call.q, key) || !encode(call.k, key) || !encode(call.v, key)) return false;
  key.push_back(call.mask != nullptr);
  if (call.mask != nullptr && !encode(*call.mask, key)) return false;
  key.push_back(bits(call.dropout_p));
  key.push_back(int64_t{call.is_causal} | int64_t{call.enable_gqa} << 1 | int64_t{call.scale.has_value()} << 2);
  key.push_back(call.scale ? bits(*call.scale) : 0);
  return true;
}

// The knobs a replay must honour (knobs.py reads the same variables; they may
// change at run time, so they are read at each call: a getenv each).
inline std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

inline bool poison_outputs() {
  std::string value = env("XEGPU_ATTN_POISON");
  value.erase(0, value.find_first_not_of(" \t\n"));
  value.erase(value.find_last_not_of(" \t\n") + 1);
  return value == "1" || value == "true" || value == "on" || value == "yes";
}

// The knobs that choose which kernel a spec gets (XEGPU_ATTN_SCHEDULE and
// XEGPU_ATTN_CPU_ISA; knobs.kernel_choice in Python, which keys the memory
// cache with the same values), as one string.
inline std::string kernel_choice() {
  return env("XEGPU_ATTN_SCHEDULE") + '\n' + env("XEGPU_ATTN_CPU_ISA");
}

// Whether a call recorded under the kernel choice `recorded` may replay now:
// XEGPU_ATTN_DUMP_IR is honoured on cache hits by the Python path, and a
// changed choice selects another kernel.
inline bool knobs_allow_replay(const std::string& recorded) {
  const char* dump = std::getenv("XEGPU_ATTN_DUMP_IR");
  if (dump != nullptr && *dump != '\0') return false;
  return recorded == kernel_choice();
}

// A kernel's last use for the memory cache's least-recently-used order: one
// clock for the kernels of every launcher (they share one cache).
inline uint64_t use_time() {
  return static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
}

}  // namespace xattn
