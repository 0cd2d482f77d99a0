// PeerGroup: a comm::Backend among the peers of one swarm round, over gRPC.
//
// Once per step the peers of a pipeline stage sum the gradients they accumulated. Who takes part
// changes from round to round (peers join, die, are fenced), so there is no launcher-made world
// and no rendezvous: a round's roster (an ordered list of HOST:PORT addresses) and its group name
// are decided elsewhere (by the coordinator), and every peer of the roster builds a PeerGroup
// from them. Frames travel as `SwarmPeer.Exchange` calls (proto/swarm.proto) from one peer's
// PeerGroup to another peer's gRPC server, which hands them to that process's ExchangeMailbox;
// the PeerGroup reads its incoming frames from the mailbox. A server that takes Exchange calls
// must accept messages of kMaxExchangeMessageBytes (a full frame and its fields).
//
//   process A                                    process B
//   PeerGroup --Exchange(frame)--> [B's gRPC server: SwarmPeer] --Deliver--> B's ExchangeMailbox
//   ExchangeMailbox <--Deliver-- [A's gRPC server] <--Exchange(frame)-- PeerGroup
//
// Determinism: every peer ends an operation with bit-identical bytes. An all-reduce is a
// reduce-scatter and an all-gather: shard s of the tensor (shards as even as the element count
// allows, the first ones one element longer) is reduced by its owner, rank s, from every rank's
// contribution in rank order 0, 1, ..., P-1 (kAvg: the sum, then each element divided by P,
// correctly rounded), and the owner sends the result to everyone. Each element is computed once,
// in one fixed order that depends only on the roster, so the result does not depend on timing.
// A reduce-scatter is the first half of that. (Broadcast: the root sends its tensor to every
// rank. All-gather: every rank sends its input to every rank.)
//
// Out of place: an operation writes the caller's tensor only after it succeeded on this peer,
// in one copy at the end; when it fails the tensor is untouched, so a round that failed keeps
// each peer's accumulation and can be run again on a new group without the fenced peer. Note
// that success here does not imply success everywhere: a peer can finish while another one, still
// waiting for its last frames, fails; whoever reruns a round decides which peers applied it.
//
// What a peer computes depends only on the frames it receives: an operation succeeds here once
// everything this rank needs has arrived, whether or not its own last frames were acknowledged
// (a peer that finished and exited at once may never acknowledge them).
//
// Failures never hang (the comm::Backend contract): an operation not done by its timeout fails
// with kDeadlineExceeded naming the ranks (and addresses) it still waited for; a peer that is
// dead or unreachable, and that this rank still needs frames from, gives kUnavailable naming it
// (found by sends whose connections kept failing, or, while waiting for its frames, by the
// channel to it failing to connect, either for PeerGroupOptions::reconnect_grace); a peer that
// refuses this peer's token gives kUnauthenticated; frames that show the ranks disagree
// (another op, dtype or size at the same position) give kInternal.
// A peer that fails tells the others (an abort frame, and its answer to any frame sent to it
// later), so that they fail at once with its code and reason instead of waiting for their
// deadline; as with a dead peer, only if they still need its frames. After any of these the
// group is unusable: later calls fail with kFailedPrecondition naming the first failure, and
// frames still arriving for it are dropped, answered with that failure. Point-to-point
// Send/Recv are not implemented (kUnimplemented); kMax and kMin are, like kSum and kAvg.
//
// Tensors: CPU, contiguous, float32/64, float16, bfloat16, int8/32/64 or uint8.
//
// Threading: a PeerGroup runs its operations in issue order on one thread of its own, so several
// may be in flight; calls return at once. Used from one thread at a time; a Work may outlive its
// PeerGroup (destroying the group fails what has not finished with kCancelled). ExchangeMailbox
// is thread-safe. gRPC completions run on gRPC's threads.
#ifndef SHOAL_COMM_PEER_GROUP_H_
#define SHOAL_COMM_PEER_GROUP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "comm/backend.h"
#include "proto/swarm.pb.h"

namespace shoal::comm {

// The most payload bytes in one frame: MAX_PIECE_BYTES of swarm.proto (4 MiB).
inline constexpr int64_t kMaxFrameBytes = v1::MAX_PIECE_BYTES;
// What a server must accept in one message to take a full frame: the payload and its fields.
inline constexpr int kMaxExchangeMessageBytes = static_cast<int>(kMaxFrameBytes) + (64 << 10);

struct ExchangeMailboxOptions {
  // Frames for operations this process has not started yet (its group is not created yet, or the
  // peer that sent them is an operation ahead) are buffered up to this many bytes; beyond it
  // Deliver answers kResourceExhausted and the sender retries until its deadline. Frames of
  // operations in progress go straight into their buffers and do not count.
  int64_t max_unclaimed_bytes = int64_t{256} << 20;
  // Buffered frames of a group that was never created here are dropped after this long.
  absl::Duration unclaimed_ttl = absl::Minutes(2);
  // How many closed groups are remembered: their late frames are refused, and their names cannot
  // be used again in this process.
  int max_closed_groups = 4096;
};

// Where frames for this process's PeerGroups arrive: the process's SwarmPeer service calls
// Deliver for every Exchange request (after checking the caller's token), and each PeerGroup
// created over the mailbox reads its frames from it. One per process, shared by every group.
// Thread-safe; Deliver never blocks for long (at most one frame's copy).
class ExchangeMailbox {
 public:
  explicit ExchangeMailbox(ExchangeMailboxOptions options = {});
  ~ExchangeMailbox();
  ExchangeMailbox(const ExchangeMailbox&) = delete;
  ExchangeMailbox& operator=(const ExchangeMailbox&) = delete;

  // Checks and takes one frame; the status and `ack` are what the Exchange call answers (absl
  // and gRPC codes are the same numbers). OK: the frame is stored (in its operation's buffer, or
  // until that operation starts here), or, with ack->abort set, dropped because its group failed
  // here (the abort says how). kInvalidArgument, naming the field: the frame contradicts
  // itself (a group name that is empty, too long or not printable; a group size < 1; a source or
  // destination rank out of range or equal; an unknown op, phase or dtype; a transfer size that
  // is negative or not a multiple of the dtype; a piece size outside [1, 4 MiB]; a piece index
  // beyond the transfer, an offset that is not piece x piece size, data of the wrong length), or
  // it contradicts its group here (group size, destination rank) or the operation running here
  // (op, dtype, sizes: that operation then fails with kInternal). kFailedPrecondition: the group
  // was destroyed here, or the operation already finished. kAlreadyExists:
  // the piece was delivered before. kResourceExhausted: too many bytes buffered for operations
  // not started yet; try again later.
  absl::Status Deliver(const v1::ExchangeFrame& frame, v1::ExchangeAck* ack);

  struct Stats {
    int64_t frames_accepted = 0;   // Deliver returned OK
    int64_t frames_refused = 0;    // Deliver returned an error
    int64_t unclaimed_bytes = 0;   // buffered now for operations not started here
  };
  Stats stats() const;

  struct Impl;

 private:
  friend class PeerGroup;
  std::unique_ptr<Impl> impl_;
};

struct PeerGroupOptions {
  // The round's peers as HOST:PORT, in rank order; every peer of the round gives the same list
  // (the order decides who reduces which shard, and so the result's bits). Entries differ.
  std::vector<std::string> roster;
  int rank = 0;                    // this peer's index in `roster`
  // The group's name, unique per round and attempt ("stage1.step42.try0"): frames of other
  // groups never mix with this one's, and a name cannot be used twice in one process.
  // 1..200 printable ASCII characters.
  std::string group;
  std::string token;               // sent as `authorization: Bearer <token>`; empty: none
  std::string tls_ca_file;         // PEM roots to check the peers' certificates; empty: plaintext
  // The default operation timeout (CollectiveOptions::timeout overrides it per call); an
  // operation's time counts from the call that issues it.
  absl::Duration timeout = absl::Seconds(60);
  int64_t frame_bytes = kMaxFrameBytes;  // payload bytes per frame, in [1, kMaxFrameBytes]
  // Frames in flight at once per operation (each holds a copy of its payload), in [1, 256].
  int max_frames_in_flight = 8;
  // While waiting for a peer's frames, how often to check that the peer can still be reached.
  absl::Duration probe_interval = absl::Milliseconds(100);
  // How long connections to a peer must keep failing before it counts as unreachable (a frame
  // is sent again meanwhile). One failed connection is not enough: a live peer's can fail.
  // Zero: at the first failure.
  absl::Duration reconnect_grace = absl::Seconds(1);
};

class PeerGroup final : public Backend {
 public:
  // Checks the options and registers the group with `mailbox`; connects to nobody yet (the first
  // operation does) and never blocks. kInvalidArgument, naming the option: an empty or
  // duplicate roster entry, one that is not HOST:PORT with a port in [1, 65535], a rank outside
  // the roster, a bad group name, a token that is not printable ASCII, a timeout <= 0, frame
  // bytes or frames in flight out of range, a CA file without a PEM certificate; kNotFound: an
  // unreadable CA file; kAlreadyExists: the group name was used before in this process.
  static absl::StatusOr<std::unique_ptr<PeerGroup>> Create(
      const PeerGroupOptions& options, std::shared_ptr<ExchangeMailbox> mailbox);
  // Fails operations not finished yet with kCancelled (the running one within about
  // probe_interval), then closes the group in the mailbox.
  ~PeerGroup() override;

  // Fails the operation running (within about probe_interval) and those queued or issued later
  // with `why` (kAborted when it is OK; the running one reports a kInvalidArgument or
  // kFailedPrecondition as kInternal, as any failure); the others are told as of any failure, and
  // the group is unusable after it. Thread-safe: another thread calls it while one waits on a
  // Work (a round the coordinator voided, say). Calls after the first change nothing.
  void Abort(const absl::Status& why);

  int rank() const override;
  int size() const override;
  std::string name() const override;  // "peergroup"
  const std::string& group() const;   // the group's name
  // Payload bytes of the frames this rank has delivered to the others so far (what a round
  // costs this peer's uplink).
  int64_t bytes_sent() const;
  const std::string& address(int rank) const;  // roster[rank]

  std::unique_ptr<Work> AllReduce(at::Tensor& tensor, ReduceOp op,
                                  const CollectiveOptions& options = {}) override;
  std::unique_ptr<Work> ReduceScatter(at::Tensor& output, const at::Tensor& input, ReduceOp op,
                                      const CollectiveOptions& options = {}) override;
  std::unique_ptr<Work> AllGather(at::Tensor& output, const at::Tensor& input,
                                  const CollectiveOptions& options = {}) override;
  std::unique_ptr<Work> Broadcast(at::Tensor& tensor, int root,
                                  const CollectiveOptions& options = {}) override;
  // Arguments are checked as for every backend (kInvalidArgument); valid ones get
  // kUnimplemented: a swarm round needs collectives only.
  std::unique_ptr<Work> Send(const at::Tensor& tensor, int dst, int tag,
                             const CollectiveOptions& options = {}) override;
  std::unique_ptr<Work> Recv(at::Tensor& tensor, int src, int tag,
                             const CollectiveOptions& options = {}) override;
  std::unique_ptr<Work> Barrier(const CollectiveOptions& options = {}) override;

  struct Impl;

 private:
  explicit PeerGroup(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct ExchangeServerOptions {
  std::string listen = "127.0.0.1:0";  // HOST:PORT; port 0 picks a free one (see port())
  std::string token;                   // empty: no authentication
  std::string tls_cert_file;           // PEM; with tls_key_file, serve TLS only
  std::string tls_key_file;
};

// A gRPC server with a SwarmPeer service that implements only Exchange (handing each frame to a
// mailbox after checking the caller's token in constant time: UNAUTHENTICATED otherwise); the
// other calls answer UNIMPLEMENTED. For tests and for processes that only reduce; a stage peer's
// runtime serves the whole service and forwards Exchange to its mailbox the same way. Accepts
// messages of up to kMaxExchangeMessageBytes.
class ExchangeServer {
 public:
  // kInvalidArgument for a bad address, half a TLS pair or a token that is not printable ASCII,
  // kNotFound for an unreadable PEM file, kUnavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<ExchangeServer>> Start(
      const ExchangeServerOptions& options, std::shared_ptr<ExchangeMailbox> mailbox);
  ~ExchangeServer();  // shuts down

  int port() const;
  void Shutdown();    // idempotent; calls in progress get at most a second to finish

  struct Impl;

 private:
  explicit ExchangeServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shoal::comm

#endif  // SHOAL_COMM_PEER_GROUP_H_
