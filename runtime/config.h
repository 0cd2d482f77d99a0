// The training configuration: a TOML file with sections [model], [data], [train], [optim],
// [checkpoint], [parallel] and [memory], plus command-line overrides `section.key=value`. Parsing
// is strict: an unknown section or key, a value of the wrong type, or an impossible value is an error whose message
// names the key (as "model.n_embd") and the file. Config is a plain value; copy it freely.
// `optimizer` is accepted as another name for `optim` (`[optimizer]` in a file,
// `optimizer.name=demo` in an override); ToToml always writes `[optim]`.
#ifndef SHOAL_RUNTIME_CONFIG_H_
#define SHOAL_RUNTIME_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/gpt_arithmetic.h"

namespace shoal::runtime {

struct ModelConfig {
  int n_layer = 4;         // transformer blocks
  int n_head = 4;          // attention heads; must divide n_embd
  int n_embd = 128;        // model width
  int block_size = 128;    // context length (tokens)
  int vocab_size = 256;    // token ids are < vocab_size; <= 65536 (uint16 token files)
};

// The shape the model arithmetic takes (common/gpt_arithmetic.h).
inline GptShape ShapeOf(const ModelConfig& m) {
  return GptShape{m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size};
}

struct DataConfig {
  std::string dir;                 // folder with train.bin, val.bin (and meta.json)
  bool verify_checksums = true;    // check meta.json's sha256 of each token file on open
};

struct TrainConfig {
  int64_t steps = 100;             // optimizer steps
  int batch_size = 16;             // sequences per micro-batch
  int grad_accum = 1;              // micro-batches per optimizer step
  uint64_t seed = 1337;            // model init and data order
  int log_every = 10;              // steps between log lines
  int eval_every = 100;            // steps between validation runs (0: only at the end)
  int eval_batches = 8;            // batches in the fixed validation set
  std::string out_dir = "runs/default";  // metrics.jsonl and (by default) checkpoints
  int omp_threads = 0;             // LibTorch/OpenMP threads; 0: chosen by shoal
  int blas_threads = 0;            // OpenBLAS threads; 0: chosen by shoal
  // The model's operations other than matrix multiplies (runtime/piece_ops.h): "fused" (the
  // hand-written CPU kernels) or "aten" (device-generic ATen calls);
  // "auto" picks fused at fp32 and aten at bf16.
  std::string kernels = "auto";
  // The compute type of activations and matrix multiplies: "fp32" or "bf16" (parameters,
  // gradients, AdamW state and checkpoints stay float32).
  std::string dtype = "fp32";
};

struct OptimConfig {
  double lr = 6e-4;                // peak learning rate
  double min_lr_ratio = 0.1;       // cosine decays to lr * min_lr_ratio
  int64_t warmup_steps = 10;       // linear warm-up from 0 to lr
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;       // on 2-D weights only
  double grad_clip = 1.0;          // global L2 norm; 0 disables
  std::string name = "adamw";      // the optimizer: "adamw" or "demo" (decoupled momentum)
  // DeMo (parallel/demo.h): each replica keeps its own momentum and exchanges only the top-k
  // DCT coefficients of every chunk. The trainer switches the gradient all-reduce off then.
  int demo_chunk = 64;             // DCT chunk length per axis (2-D tiles are chunk x chunk)
  int demo_topk = 32;              // coefficients kept per chunk/tile (clamped to its size)
  double demo_decay = 0.999;       // momentum decay, in [0, 1)
  std::string demo_wire = "bf16";  // value type on the wire: "fp32", "bf16" or "fp16"
  double demo_weight_decay = 0.0;  // DeMo's decoupled decay (the reference runs use 0)
  int demo_drift_check = 50;       // steps between replica parameter-hash checks; 0: off
};

struct CheckpointConfig {
  std::string dir;                 // default: <train.out_dir>/checkpoints
  int every = 0;                   // steps between checkpoints; 0: only at the end
  int keep = 3;                    // newest checkpoints kept; older ones are deleted
};

struct ParallelConfig {
  std::string backend = "gloo";    // collectives between ranks: "gloo", "mpi" or "nccl"
  int zero = 0;                    // 1: shard optimizer state across data-parallel ranks (ZeRO-1)
  double bucket_mb = 25;           // gradient all-reduce bucket size
  double timeout_s = 60;           // rendezvous and collective timeout
  // Model parallelism: the world's ranks form a (tp, pp, dp) mesh with dp = ranks / (tp * pp)
  // (parallel/mesh.h). A layout from the coordinator, when there is one, takes precedence.
  int tp = 1;                      // tensor-parallel ranks per stage; divides model.n_head
  int pp = 1;                      // pipeline stages
  // Blocks per model stage, pp x virtual_stages entries summing to n_layer (model stage
  // c * pp + s is chunk c of stage s); empty: even.
  std::vector<int> stages;
  std::string schedule = "1f1b";   // pipeline schedule: "1f1b", "gpipe" or "interleaved";
                                   // train.grad_accum micro-batches flow through it
  int virtual_stages = 1;          // model chunks per pipeline rank; >= 2 with "interleaved"
};

// A size with an optional unit as the config gives it ("512MiB", "8GiB", "2.5GB", "1000000"
// bytes): the text as written, kept for messages and ToToml, and its value, parsed once when the
// config is read (ParseByteSize below). Unset: empty text and 0 bytes.
struct ByteSize {
  std::string text;
  int64_t bytes = 0;
  bool set() const { return !text.empty(); }
  // Parses `text` (empty: unset). kInvalidArgument naming `what` for anything ParseByteSize
  // refuses.
  static absl::StatusOr<ByteSize> Parse(const std::string& text, const std::string& what);
  bool operator==(const ByteSize& other) const {
    return text == other.text && bytes == other.bytes;
  }
};

// Memory budgets per tier (unset: what the machine has). They bound what this worker reports to
// the coordinator, whose layout solver plans within them, and the chunk manager holds the process
// to them (memory/state_plan.h).
struct MemoryConfig {
  ByteSize device_budget;          // CUDA device memory (a worker without one has no such tier)
  ByteSize host_budget;            // host RAM
  ByteSize disk_budget;            // the disk tier (under disk_path)
  // Where the disk tier's file goes. With host_budget too small for the model states, the AdamW
  // moments that do not fit go there (data parallelism and one process; not in mesh mode yet).
  std::string disk_path;
  // Activations kept between forward and backward, per micro-batch: the blocks that do not fit
  // recompute their forward in backward, or offload their activations to the disk tier under
  // disk_path (empty: every block keeps its activations).
  ByteSize activation_budget;
  // Whether the blocks that do not fit offload: "auto" (when disk_path is set and its measured
  // bandwidth makes that cheaper than recomputing), "never" (recompute) or "always" (offload;
  // needs disk_path).
  std::string activation_offload = "auto";
};

// Swarm mode (`shoal coordinator --swarm`): how a stage's peers combine their gradients.
struct SwarmConfig {
  // "fp32": the stage round sums fp32 gradients and every peer steps AdamW; "demo": peers
  // exchange DeMo's top-k DCT payloads and step DeMo (the optim.demo_* keys); "auto": DeMo when
  // optim.name = "demo" or when the first peer's link to the coordinator measured slower than
  // slow_link_mbit, fp32 otherwise (decided once per job, when its first peer joins).
  std::string sync = "auto";
  double slow_link_mbit = 1000;    // "auto"'s threshold, Mb/s
};

struct Config {
  ModelConfig model;
  DataConfig data;
  TrainConfig train;
  OptimConfig optim;
  CheckpointConfig checkpoint;
  ParallelConfig parallel;
  MemoryConfig memory;
  SwarmConfig swarm;
  std::string source = "<defaults>";   // where it came from, for messages

  // Every key in TOML form; ParseConfig(ToToml()) gives back an equal Config (all but
  // `source`; train.seed must fit in int64, as TOML integers do).
  std::string ToToml() const;
};

// Parses TOML text (`source` names it in messages), applies `overrides` ("section.key=value",
// in order; the value is read as a TOML value, and as a string when that fails; a string key
// takes the raw text unless it is a quoted TOML string), then validates. Integers are accepted
// where floats are expected; an integer outside int's range for an int field is an error.
// kInvalidArgument names the offending key (with the line) or override; TOML syntax errors
// read "<source>:<line>:<column>: ...".
absl::StatusOr<Config> ParseConfig(const std::string& toml_text, const std::string& source,
                                   const std::vector<std::string>& overrides = {});

// Reads and parses a file; kNotFound names a missing file.
absl::StatusOr<Config> LoadConfig(const std::string& path,
                                  const std::vector<std::string>& overrides = {});

// Checks the values that do not need the data: positive sizes, n_embd % n_head == 0,
// 0 <= beta < 1, min_lr_ratio in [0, 1], vocab_size in [2, 65536], finite lr/eps/decay/clip,
// non-empty data.dir and train.out_dir, the DeMo keys, and optim.name = "demo" only with
// parallel.zero = 0 and tp = pp = 1. kInvalidArgument lists every problem, each naming its
// key. Filling an empty checkpoint.dir from train.out_dir is NOT done here (see
// ResolvedCheckpointDir).
absl::Status ValidateConfig(const Config& config);

// A size with an optional unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of
// 1024), case-insensitive, spaces allowed before the unit; a fraction is allowed ("1.5GiB").
// kInvalidArgument naming `what` for anything else, a negative size or one beyond 2^62 bytes.
absl::StatusOr<int64_t> ParseByteSize(const std::string& text, const std::string& what);

// checkpoint.dir, or <train.out_dir>/checkpoints when it is empty.
std::string ResolvedCheckpointDir(const Config& config);

}  // namespace shoal::runtime

#endif  // SHOAL_RUNTIME_CONFIG_H_
