#include "comm/grpc_util.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/auth_token.h"
#include "common/file_util.h"
#include "common/status.h"

namespace shoal::comm {

absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view what,
                                    absl::string_view marker) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) {
    return absl::NotFoundError(
        absl::StrCat("cannot read ", what, " ", path, ": ", text.status().message()));
  }
  if (!absl::StrContains(*text, marker)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " holds no PEM block (",
                                                   marker, ")"));
  }
  return text;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCredentials(
    const std::string& ca_file, absl::string_view what) {
  if (ca_file.empty()) return grpc::InsecureChannelCredentials();
  SHOAL_ASSIGN_OR_RETURN(std::string ca, ReadPem(ca_file, what, "-----BEGIN CERTIFICATE-----"));
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = std::move(ca);
  return grpc::SslCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const std::string& cert_file, const std::string& key_file, absl::string_view what) {
  if (cert_file.empty() && key_file.empty()) return grpc::InsecureServerCredentials();
  if (cert_file.empty() || key_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": TLS needs both a certificate file and a key file"));
  }
  SHOAL_ASSIGN_OR_RETURN(std::string cert, ReadPem(cert_file, absl::StrCat(what, "'s TLS certificate"),
                                                   "-----BEGIN CERTIFICATE-----"));
  SHOAL_ASSIGN_OR_RETURN(std::string key, ReadPem(key_file, absl::StrCat(what, "'s TLS key"),
                                                  "PRIVATE KEY-----"));
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({std::move(key), std::move(cert)});
  return grpc::SslServerCredentials(ssl);
}

absl::Status FromGrpc(absl::string_view call, const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(call, ": ", status.error_message()));
}

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status CheckBearer(const grpc::ServerContext& ctx, const std::string& token) {
  if (token.empty()) return grpc::Status::OK;
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing authorization metadata (Bearer token)");
  }
  if (!ConstantTimeEquals(absl::string_view(it->second.data(), it->second.size()),
                          absl::StrCat("Bearer ", token))) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong token");
  }
  return grpc::Status::OK;
}

void AddBearer(grpc::ClientContext* ctx, const std::string& token) {
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

}  // namespace shoal::comm
