// Rendezvous and Connect in one process: option validation, the timeouts that name the missing
// rank, world-size mismatches, and a world of 2 over real loopback sockets (two threads).
#include <ATen/ATen.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <future>
#include <thread>

#include "core/comm/connect.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace crossdiff::comm {
namespace {

using ::testing::HasSubstr;

RendezvousOptions Options(int rank, int world, int port, int timeout_ms) {
  RendezvousOptions o;
  o.backend = "gloo";
  o.rank = rank;
  o.world_size = world;
  o.host = "127.0.0.1";
  o.port = port;
  o.timeout = std::chrono::milliseconds(timeout_ms);
  return o;
}

// A port nothing listens on: bind port 0, read it back, close the socket.
int UnusedPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

TEST(RendezvousTest, RejectsBadOptionsNamingTheField) {
  auto bad_rank = Connect(Options(2, 2, 1234, 1000));
  EXPECT_EQ(bad_rank.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_rank.status().message(), HasSubstr("rank: 2 is outside [0, 2)"));

  RendezvousOptions backend = Options(0, 1, 0, 1000);
  backend.backend = "mpi";
  EXPECT_THAT(Connect(backend).status().message(), HasSubstr("backend: 'mpi'"));

  auto no_port = Connect(Options(1, 2, 0, 1000));
  EXPECT_EQ(no_port.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(no_port.status().message(), HasSubstr("port: rank 1 needs the port rank 0 bound"));
}

TEST(RendezvousTest, RankThatNeverJoinsTimesOutNamingIt) {
  int bound = 0;
  RendezvousOptions o = Options(0, 3, 0, 1000);
  o.on_store_bound = [&bound](int port) { bound = port; };
  auto comm = Connect(o);
  EXPECT_GT(bound, 0);
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(comm.status().message(), HasSubstr("rank 0: rendezvous at 127.0.0.1:"));
  EXPECT_THAT(comm.status().message(), HasSubstr("ranks 1, 2 never joined (1 of 3 joined)"));
}

TEST(RendezvousTest, UnreachableStoreTimesOutNamingTheAddress) {
  const int port = UnusedPort();
  auto comm = Connect(Options(1, 2, port, 1000));
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(comm.status().message(),
              HasSubstr("rank 1: rendezvous store at 127.0.0.1:" + std::to_string(port) +
                        " (hosted by rank 0) not reachable within 1s"));
}

// Ranks may start before rank 0 binds the store (multi-machine launches): they keep trying.
TEST(RendezvousTest, RankStartedBeforeTheStoreHostWaitsForIt) {
  const int port = UnusedPort();
  auto rank1 = std::async(std::launch::async, [&] { return Connect(Options(1, 2, port, 20000)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  auto rank0 = Connect(Options(0, 2, port, 20000));
  auto comm1 = rank1.get();
  ASSERT_TRUE(comm1.ok()) << comm1.status();
  ASSERT_TRUE(rank0.ok()) << rank0.status();
  comm1->reset();
}

TEST(RendezvousTest, WorldSizeMismatchIsRejected) {
  std::promise<int> port;
  RendezvousOptions o0 = Options(0, 2, 0, 2000);
  o0.on_store_bound = [&port](int p) { port.set_value(p); };
  auto host = std::async(std::launch::async, [&] { return Connect(o0); });
  auto comm = Connect(Options(1, 3, port.get_future().get(), 2000));
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(comm.status().message(), HasSubstr("rank 1: world size 3 but rank 0"));
  EXPECT_THAT(comm.status().message(), HasSubstr("uses 2"));
  EXPECT_EQ(host.get().status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(RendezvousTest, TwoProcessesClaimingOneRankAreRejected) {
  std::promise<int> port;
  RendezvousOptions o0 = Options(0, 2, 0, 5000);
  o0.on_store_bound = [&port](int p) { port.set_value(p); };
  auto host = std::async(std::launch::async, [&] { return Connect(o0); });
  const int p = port.get_future().get();
  auto first = std::async(std::launch::async, [&] { return Connect(Options(1, 2, p, 5000)); });
  auto rank0 = host.get();
  auto rank1 = first.get();
  ASSERT_TRUE(rank0.ok()) << rank0.status();
  ASSERT_TRUE(rank1.ok()) << rank1.status();
  auto second = Connect(Options(1, 2, p, 5000));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(second.status().message(),
              HasSubstr("rank 1: another process already joined 127.0.0.1:" + std::to_string(p) +
                        " as rank 1"));
  rank1->reset();  // closes before the store host, as in a real run
}

// Two ranks as two threads of this process, over real sockets.
TEST(RendezvousTest, TwoRanksInOneProcessAllReduce) {
  std::promise<int> port;
  RendezvousOptions o0 = Options(0, 2, 0, 30000);
  o0.on_store_bound = [&port](int p) { port.set_value(p); };
  auto rank0 = std::async(std::launch::async, [&]() -> absl::Status {
    auto comm = Connect(o0);
    if (!comm.ok()) return comm.status();
    at::Tensor t = at::full({4}, 1.0);
    if (absl::Status s = (*comm)->AllReduce(t); !s.ok()) return s;
    return t.equal(at::full({4}, 3.0)) ? absl::OkStatus() : absl::InternalError("rank 0 sum");
  });
  auto comm1 = Connect(Options(1, 2, port.get_future().get(), 30000));
  ASSERT_TRUE(comm1.ok()) << comm1.status();
  EXPECT_EQ((*comm1)->rank(), 1);
  EXPECT_EQ((*comm1)->world_size(), 2);
  EXPECT_EQ((*comm1)->backend(), "gloo");
  at::Tensor t = at::full({4}, 2.0);
  ASSERT_TRUE((*comm1)->AllReduce(t).ok());
  EXPECT_TRUE(t.equal(at::full({4}, 3.0)));
  EXPECT_EQ((*comm1)->bytes_communicated(), 16);  // ring model: 2 (W-1)/W x 4 floats
  comm1->reset();  // rank 0 (the store host) waits for the others to close first
  EXPECT_TRUE(rank0.get().ok());
}

TEST(LocalCommunicatorTest, CollectivesAreTheIdentity) {
  auto comm = Connect(Options(0, 1, 0, 1000));
  ASSERT_TRUE(comm.ok());
  RendezvousOptions local = Options(0, 1, 0, 1000);
  local.backend = "local";
  auto lc = Connect(local);
  ASSERT_TRUE(lc.ok());
  EXPECT_EQ((*lc)->backend(), "local");
  for (Communicator* c : {comm->get(), lc->get()}) {
    at::Tensor t = at::arange(5);
    ASSERT_TRUE(c->AllReduce(t, ReduceOp::kMax).ok());
    EXPECT_TRUE(t.equal(at::arange(5)));
    at::Tensor out = at::zeros({5}, at::kLong);
    ASSERT_TRUE(c->AllGather(at::arange(5), out).ok());
    EXPECT_TRUE(out.equal(at::arange(5)));
    at::Tensor rs = at::zeros({5}, at::kLong);
    ASSERT_TRUE(c->ReduceScatter(at::arange(5), rs).ok());
    EXPECT_TRUE(rs.equal(at::arange(5)));
    ASSERT_TRUE(c->Broadcast(t, 0).ok());
    ASSERT_TRUE(c->Barrier().ok());
    EXPECT_EQ(c->Broadcast(t, 1).code(), absl::StatusCode::kInvalidArgument);
    at::Tensor wrong = at::zeros({4}, at::kLong);
    EXPECT_THAT(c->AllGather(at::arange(5), wrong).message(),
                HasSubstr("rank 0: AllGather: the large tensor has 4 elements"));
  }
}

TEST(ConnectTest, NcclWithoutCudaBuildIsUnimplemented) {
  if (HaveNcclBackend()) GTEST_SKIP() << "this build has the NCCL backend";
  RendezvousOptions o = Options(0, 1, 0, 1000);
  o.backend = "nccl";
  EXPECT_EQ(Connect(o).status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace crossdiff::comm
