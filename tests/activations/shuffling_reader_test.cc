// The shuffling reader: coverage, determinism, rank sharding, resume, bounded memory.
#include "core/activations/shuffling_reader.h"

#include <algorithm>
#include <fstream>
#include <numeric>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/activations/store_fixture.h"
#include "tests/tensor_io/test_util.h"

namespace crossdiff::activations {
namespace {

using ::crossdiff::testing_util::ScratchDir;
using ::testing::HasSubstr;

// A 1000-row store in 7 shards (150 rows each, the last 100); row i has sequence id i.
class ShufflingReaderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScratchDir();
    auto m = testing_util::WriteStore(dir_->path(), 1000, 2, 4, "bfloat16", 150);
    ASSERT_TRUE(m.ok()) << m.status();
    auto store = StoreReader::Open(dir_->path());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = store->release();
  }
  static void TearDownTestSuite() {
    delete store_;
    delete dir_;
  }

  static std::unique_ptr<ShufflingReader> Make(ShufflingReaderOptions o) {
    auto r = ShufflingReader::Create(store_, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::move(*r) : nullptr;
  }
  static ShufflingReaderOptions Defaults() {
    ShufflingReaderOptions o;
    o.batch_size = 10;
    o.buffer_rows = 100;
    o.chunk_rows = 20;
    o.seed = 42;
    return o;
  }
  // The sequence ids (= global rows) of the next `n` batches, concatenated.
  static std::vector<int64_t> Rows(ShufflingReader& r, int n) {
    std::vector<int64_t> out;
    for (int i = 0; i < n; ++i) {
      auto b = r.Next();
      EXPECT_TRUE(b.ok()) << b.status();
      if (!b.ok()) break;
      auto ids = b->sequence_ids.contiguous();
      out.insert(out.end(), ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    }
    return out;
  }

  static ScratchDir* dir_;
  static StoreReader* store_;
};
ScratchDir* ShufflingReaderTest::dir_ = nullptr;
StoreReader* ShufflingReaderTest::store_ = nullptr;

TEST_F(ShufflingReaderTest, EveryRowOncePerEpochWithItsData) {
  auto r = Make(Defaults());
  ASSERT_EQ(r->batches_per_epoch(), 100);
  std::vector<int64_t> seen;
  for (int i = 0; i < 100; ++i) {
    auto b = r->Next();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_EQ(b->activations.sizes(), at::IntArrayRef({10, 2, 4}));
    ASSERT_EQ(b->activations.scalar_type(), at::kFloat);
    // Each row carries its own activations and ids.
    std::vector<int64_t> ids(b->sequence_ids.data_ptr<int64_t>(),
                             b->sequence_ids.data_ptr<int64_t>() + 10);
    auto direct = store_->GatherRows(ids);
    ASSERT_TRUE(direct.ok());
    EXPECT_TRUE(at::equal(b->activations, direct->activations));
    EXPECT_TRUE(at::equal(b->positions, direct->positions));
    seen.insert(seen.end(), ids.begin(), ids.end());
  }
  std::vector<int64_t> sorted = seen;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> all(1000);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(sorted, all);
  EXPECT_NE(seen, all);  // shuffled
  EXPECT_EQ(r->cursor().epoch, 0);
  EXPECT_EQ(r->cursor().batch, 100);
}

TEST_F(ShufflingReaderTest, NextActivationsMatchesNext) {
  auto a = Make(Defaults());
  auto b = Make(Defaults());
  ASSERT_TRUE(a && b);
  at::Tensor buffer = at::empty({10, 2, 4});
  for (int i = 0; i < 205; ++i) {  // past two epochs of 100 batches
    auto batch = a->Next();
    ASSERT_TRUE(batch.ok()) << batch.status();
    ASSERT_TRUE(b->NextActivations(buffer.data_ptr<float>()).ok());
    ASSERT_TRUE(at::equal(buffer, batch->activations)) << "batch " << i;
  }
  EXPECT_EQ(a->State(), b->State());
}

TEST_F(ShufflingReaderTest, ShufflesAcrossShardsWithinTheBuffer) {
  auto r = Make(Defaults());
  std::vector<int64_t> first = Rows(*r, 1);
  std::set<int64_t> shards;
  for (int64_t row : first) shards.insert(row / 150);
  EXPECT_GE(shards.size(), 2u);
  // A window holds buffer_rows rows: the first 10 batches come from 5 chunks of 20 rows.
  std::vector<int64_t> window = first;
  auto more = Rows(*r, 9);
  window.insert(window.end(), more.begin(), more.end());
  std::set<int64_t> chunks;
  for (int64_t row : window) chunks.insert(row / 20);
  EXPECT_EQ(chunks.size(), 5u);
}

TEST_F(ShufflingReaderTest, DeterministicForASeed) {
  auto a = Make(Defaults());
  auto b = Make(Defaults());
  ShufflingReaderOptions other = Defaults();
  other.seed = 43;
  auto c = Make(other);
  std::vector<int64_t> ra = Rows(*a, 30), rb = Rows(*b, 30), rc = Rows(*c, 30);
  EXPECT_EQ(ra, rb);
  EXPECT_NE(ra, rc);
}

TEST_F(ShufflingReaderTest, EpochsLoopForeverWithFreshOrder) {
  auto r = Make(Defaults());
  std::vector<int64_t> e0 = Rows(*r, 100);
  std::vector<int64_t> e1 = Rows(*r, 100);
  EXPECT_EQ(r->cursor().epoch, 1);
  EXPECT_NE(e0, e1);
  std::sort(e0.begin(), e0.end());
  std::sort(e1.begin(), e1.end());
  EXPECT_EQ(e0, e1);
  std::vector<int64_t> e2 = Rows(*r, 150);
  EXPECT_EQ(e2.size(), 1500u);
  EXPECT_EQ(r->cursor().epoch, 3);
}

TEST_F(ShufflingReaderTest, RanksSplitEveryGlobalBatch) {
  ShufflingReaderOptions single = Defaults();
  single.batch_size = 30;
  auto whole = Make(single);
  std::vector<std::unique_ptr<ShufflingReader>> ranks;
  for (int rank = 0; rank < 3; ++rank) {
    ShufflingReaderOptions o = Defaults();
    o.world_size = 3;
    o.rank = rank;
    ranks.push_back(Make(o));
  }
  EXPECT_EQ(ranks[0]->batches_per_epoch(), whole->batches_per_epoch());
  for (int step = 0; step < 40; ++step) {  // crosses an epoch boundary (33 per epoch)
    std::vector<int64_t> expected = Rows(*whole, 1);
    std::vector<int64_t> got;
    for (auto& r : ranks) {
      std::vector<int64_t> part = Rows(*r, 1);
      ASSERT_EQ(part.size(), 10u);
      got.insert(got.end(), part.begin(), part.end());
    }
    EXPECT_EQ(got, expected) << "step " << step;
  }
}

TEST_F(ShufflingReaderTest, ResumeYieldsTheSameBatchesAsAnUninterruptedRun) {
  ShufflingReaderOptions o = Defaults();
  o.drop_last = false;
  o.batch_size = 7;  // 1000 = 142 * 7 + 6: a partial batch at each epoch end
  auto uninterrupted = Make(o);
  Rows(*uninterrupted, 137);
  const std::string state = uninterrupted->State();
  std::vector<at::Tensor> expected;
  for (int i = 0; i < 20; ++i) {  // crosses the epoch boundary and the partial batch
    auto b = uninterrupted->Next();
    ASSERT_TRUE(b.ok());
    expected.push_back(b->activations);
  }

  auto resumed = Make(o);  // a new process: nothing shared but the state string
  ASSERT_TRUE(resumed->Restore(state).ok());
  for (int i = 0; i < 20; ++i) {
    auto b = resumed->Next();
    ASSERT_TRUE(b.ok());
    ASSERT_TRUE(at::equal(b->activations, expected[i])) << "batch " << i;
  }
  EXPECT_EQ(resumed->cursor().epoch, uninterrupted->cursor().epoch);
  EXPECT_EQ(resumed->cursor().batch, uninterrupted->cursor().batch);
  EXPECT_EQ(resumed->State(), uninterrupted->State());
}

TEST_F(ShufflingReaderTest, RestoreRefusesAnotherConfiguration) {
  auto a = Make(Defaults());
  Rows(*a, 3);
  ShufflingReaderOptions o = Defaults();
  o.batch_size = 20;
  auto b = Make(o);
  absl::Status s = b->Restore(a->State());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'batch_size' was 10 when saved"));
  s = b->Restore("{}");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ShufflingReaderTest, RowRangeHoldsOutAValidationSplit) {
  ShufflingReaderOptions train = Defaults();
  train.row_end = 800;
  ShufflingReaderOptions val = Defaults();
  val.row_begin = 800;
  val.shuffle = false;
  val.drop_last = false;
  val.batch_size = 64;
  auto t = Make(train);
  auto v = Make(val);
  EXPECT_EQ(t->batches_per_epoch(), 80);
  EXPECT_EQ(v->batches_per_epoch(), 4);  // 64, 64, 64, 8
  for (int64_t row : Rows(*t, 160)) ASSERT_LT(row, 800);
  std::vector<int64_t> vr = Rows(*v, 4);
  std::vector<int64_t> expected(200);
  std::iota(expected.begin(), expected.end(), 800);
  EXPECT_EQ(vr, expected);  // unshuffled, in store order
}

TEST_F(ShufflingReaderTest, DropLastFalseSplitsTheLastBatchOverRanks) {
  ShufflingReaderOptions o = Defaults();
  o.batch_size = 300;
  o.world_size = 2;
  o.drop_last = false;  // 1000 = 1 * 600 + 400 -> last batch 200 per rank
  std::vector<int64_t> all;
  for (int rank = 0; rank < 2; ++rank) {
    o.rank = rank;
    auto r = Make(o);
    ASSERT_EQ(r->batches_per_epoch(), 2);
    auto first = r->Next();
    auto second = r->Next();
    ASSERT_TRUE(first.ok() && second.ok());
    EXPECT_EQ(first->rows(), 300);
    EXPECT_EQ(second->rows(), 200);
    for (auto* b : {&*first, &*second}) {
      all.insert(all.end(), b->sequence_ids.data_ptr<int64_t>(),
                 b->sequence_ids.data_ptr<int64_t>() + b->rows());
    }
  }
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::unique(all.begin(), all.end()) - all.begin(), 1000);
}

TEST_F(ShufflingReaderTest, BadOptionsAreRejected) {
  ShufflingReaderOptions o = Defaults();
  o.rank = 2;
  o.world_size = 2;
  auto r = ShufflingReader::Create(store_, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("option 'rank' is 2, must be in [0, 2)"));
  o = Defaults();
  o.row_end = 2000;
  r = ShufflingReader::Create(store_, o);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("option 'row_begin/row_end'"));
  o = Defaults();
  o.batch_size = 2000;
  r = ShufflingReader::Create(store_, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("hold 1000 rows, too few for one batch of 2000"));
}

TEST(ShufflingReaderMemoryTest, MemoryStaysBoundedOnAStoreLargerThanTheBuffer) {
  ScratchDir dir;
  // 16384 rows x 2 models x 512 floats = 64 MiB of activations; the buffer is 512 rows (2 MiB).
  {
    StoreWriter::Options opts;
    opts.models = {"a", "b"};
    opts.d_model = 512;
    opts.rows_per_shard = 4096;
    auto w = StoreWriter::Create(dir.path(), opts);
    ASSERT_TRUE(w.ok());
    for (int part = 0; part < 16; ++part) {
      ASSERT_TRUE((*w)->Append(testing_util::MakeRows(1024, 2, 512, part)).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
  }
  ShufflingReaderOptions o;
  o.batch_size = 128;
  o.buffer_rows = 512;
  auto r = ShufflingReader::Open(dir.path(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE((*r)->Next().ok());  // warm up allocator and code pages
  const int64_t before = testing_util::ResidentBytes();
  int64_t peak = before;
  for (int i = 0; i < 2 * 128; ++i) {  // two full epochs over 64 MiB
    auto b = (*r)->Next();
    ASSERT_TRUE(b.ok()) << b.status();
    peak = std::max(peak, testing_util::ResidentBytes());
  }
  const int64_t store_bytes = int64_t{16384} * 2 * 512 * 4;
  // Without dropping mapped pages the whole store (64 MiB) would become resident.
  EXPECT_LT(peak - before, store_bytes / 4) << "before " << before << " peak " << peak;
}

}  // namespace
}  // namespace crossdiff::activations
