// What every gRPC endpoint of shoal's workers does the same way: credentials from PEM files
// (checked, with errors that name the file), the job's token as `authorization: Bearer <token>`
// checked in constant time, and status codes carried across (gRPC's codes are absl's, number for
// number).
#ifndef SHOAL_COMM_GRPC_UTIL_H_
#define SHOAL_COMM_GRPC_UTIL_H_

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace shoal::comm {

// The file's text. kNotFound for an unreadable file, kInvalidArgument when it holds no `marker`
// ("-----BEGIN CERTIFICATE-----", "PRIVATE KEY-----"); `what` names the file in the message.
absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view what,
                                    absl::string_view marker);

// Plaintext when `ca_file` is empty, else TLS checking the server against its PEM roots.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCredentials(
    const std::string& ca_file, absl::string_view what);
// Plaintext when both files are empty, else TLS with that certificate and key. kInvalidArgument
// for half a pair.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const std::string& cert_file, const std::string& key_file, absl::string_view what);

// "<call>: <message>" with the same code; OK stays OK.
absl::Status FromGrpc(absl::string_view call, const grpc::Status& status);
grpc::Status ToGrpc(const absl::Status& status);

// UNAUTHENTICATED unless the call carries `authorization: Bearer <token>`; OK for any call when
// `token` is empty (no authentication).
grpc::Status CheckBearer(const grpc::ServerContext& ctx, const std::string& token);
// Puts the token on a call (nothing when empty).
void AddBearer(grpc::ClientContext* ctx, const std::string& token);

}  // namespace shoal::comm

#endif  // SHOAL_COMM_GRPC_UTIL_H_
