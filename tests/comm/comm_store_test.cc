// Rendezvous stores: a real TCP server on a free port of 127.0.0.1 with clients in this process,
// a real file store, prefix views, and the failures (missing key, nobody listening, port taken).
#include "comm/store.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tests/test_util.h"

namespace shoal::comm {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::shared_ptr<Store> Server(int world_size = 2) {
  TcpStoreOptions o;
  o.port = 0;
  o.is_server = true;
  o.world_size = world_size;
  o.timeout = absl::Seconds(10);
  auto s = MakeTcpStore(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : nullptr;
}

std::shared_ptr<Store> Client(int port, absl::Duration timeout = absl::Seconds(10)) {
  TcpStoreOptions o;
  o.port = port;
  o.world_size = 2;
  o.timeout = timeout;
  auto s = MakeTcpStore(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : nullptr;
}

TEST(TcpStoreTest, ServerOnPortZeroPicksAFreePortThatClientsReach) {
  auto server = Server();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->port(), 0);
  auto client = Client(server->port());
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->port(), server->port());

  ASSERT_TRUE(server->Set("greeting", "hello").ok());
  auto got = client->Get("greeting", absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "hello");
  ASSERT_TRUE(client->Set("greeting", std::string("bye\0!", 5)).ok());
  EXPECT_EQ(*server->Get("greeting", absl::Seconds(5)), std::string("bye\0!", 5));

  EXPECT_EQ(*client->Add("counter", 5), 5);
  EXPECT_EQ(*server->Add("counter", -2), 3);
  EXPECT_TRUE(server->Wait({"greeting", "counter"}, absl::Seconds(1)).ok());
}

TEST(TcpStoreTest, WaitReturnsWhenAnotherClientSetsTheKeyLater) {
  auto server = Server();
  auto client = Client(server->port());
  std::thread setter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ASSERT_TRUE(client->Set("late", "here").ok());
  });
  auto got = server->Get("late", absl::Seconds(10));
  setter.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "here");
}

TEST(TcpStoreTest, MissingKeyIsDeadlineExceededNamingTheKey) {
  auto server = Server();
  const auto start = std::chrono::steady_clock::now();
  auto got = server->Get("never-set", absl::Milliseconds(300));
  EXPECT_TRUE(absl::IsDeadlineExceeded(got.status())) << got.status();
  EXPECT_TRUE(absl::StrContains(got.status().message(), "never-set")) << got.status();
  EXPECT_GE(SecondsSince(start), 0.25);
  EXPECT_LT(SecondsSince(start), 10);
  // The connection is still in step after a timeout.
  ASSERT_TRUE(server->Set("after", "ok").ok());
  EXPECT_EQ(*server->Get("after", absl::Seconds(1)), "ok");
}

TEST(TcpStoreTest, NobodyListeningIsUnavailableNamingHostAndPort) {
  const int port = ::shoal::testing::FreePort();
  TcpStoreOptions o;
  o.port = port;
  o.timeout = absl::Seconds(2);
  const auto start = std::chrono::steady_clock::now();
  auto store = MakeTcpStore(o);
  EXPECT_TRUE(absl::IsUnavailable(store.status()) || absl::IsDeadlineExceeded(store.status()))
      << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), absl::StrCat("127.0.0.1:", port)))
      << store.status();
  EXPECT_LT(SecondsSince(start), 20);
}

TEST(TcpStoreTest, UnresolvableHostFails) {
  TcpStoreOptions o;
  o.host = "no-such-host.invalid";
  o.port = 29999;
  o.timeout = absl::Seconds(2);
  const auto start = std::chrono::steady_clock::now();
  auto store = MakeTcpStore(o);
  EXPECT_TRUE(absl::IsUnavailable(store.status()) || absl::IsDeadlineExceeded(store.status()))
      << store.status();
  EXPECT_LT(SecondsSince(start), 20);
}

TEST(TcpStoreTest, PortAlreadyServedIsUnavailable) {
  auto first = Server();
  TcpStoreOptions o;
  o.port = first->port();
  o.is_server = true;
  o.timeout = absl::Seconds(2);
  auto second = MakeTcpStore(o);
  EXPECT_TRUE(absl::IsUnavailable(second.status())) << second.status();
  EXPECT_TRUE(absl::StrContains(second.status().message(), std::to_string(first->port())))
      << second.status();
}

TEST(TcpStoreTest, BadOptionsAreInvalidArgument) {
  TcpStoreOptions o;
  o.port = 0;  // only a server may ask for any port
  EXPECT_TRUE(absl::IsInvalidArgument(MakeTcpStore(o).status()));
  o.port = 70000;
  EXPECT_TRUE(absl::IsInvalidArgument(MakeTcpStore(o).status()));
  o.port = 29500;
  o.world_size = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(MakeTcpStore(o).status()));
}

TEST(FileStoreTest, TwoStoresOnOneFileSeeEachOther) {
  shoal::testing::TempDir dir;
  auto a = MakeFileStore(dir / "store", 2, absl::Seconds(5));
  auto b = MakeFileStore(dir / "store", 2, absl::Seconds(5));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*a)->port(), 0);
  ASSERT_TRUE((*a)->Set("k", "v").ok());
  EXPECT_EQ(*(*b)->Get("k", absl::Seconds(1)), "v");
  EXPECT_EQ(*(*a)->Add("n", 2), 2);
  EXPECT_EQ(*(*b)->Add("n", 3), 5);
  auto missing = (*b)->Get("missing", absl::Milliseconds(100));
  EXPECT_TRUE(absl::IsDeadlineExceeded(missing.status())) << missing.status();
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "missing"));
}

TEST(FileStoreTest, UnwritableDirectoryFails) {
  auto s = MakeFileStore("/nonexistent-dir/sub/store", 1, absl::Seconds(1));
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.status().message(), "/nonexistent-dir/sub/store"))
      << s.status();
}

TEST(PrefixStoreTest, KeysLiveUnderThePrefix) {
  auto server = Server();
  auto group_a = MakePrefixStore("a", server);
  auto group_b = MakePrefixStore("b", server);
  EXPECT_EQ(group_a->port(), server->port());
  ASSERT_TRUE(group_a->Set("k", "from a").ok());
  ASSERT_TRUE(group_b->Set("k", "from b").ok());
  EXPECT_EQ(*group_a->Get("k", absl::Seconds(1)), "from a");
  EXPECT_EQ(*group_b->Get("k", absl::Seconds(1)), "from b");
  EXPECT_EQ(*server->Get("a/k", absl::Seconds(1)), "from a");
  auto missing = group_b->Get("only-in-a", absl::Milliseconds(100));
  EXPECT_TRUE(absl::IsDeadlineExceeded(missing.status()));
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "prefix 'b/'")) << missing.status();
}

TEST(PrefixStoreTest, KeepsTheServerAlive) {
  std::shared_ptr<Store> view;
  int port = 0;
  {
    auto server = Server();
    port = server->port();
    view = MakePrefixStore("p", server);
  }
  ASSERT_TRUE(view->Set("k", "v").ok());
  auto client = Client(port);
  EXPECT_EQ(*client->Get("p/k", absl::Seconds(1)), "v");
}

}  // namespace
}  // namespace shoal::comm
