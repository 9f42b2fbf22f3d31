// BranchyStream (dynamic/branchy_stream.h): early-exit inference over a stream of batches gives
// the same exits and logits as per-batch inference, queues run once they hold min_batch samples,
// and bad input is refused with the module's name.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "branchy_test_util.h"
#include "dynattn/dynamic/branchy_stream.h"
#include "test_util.h"
#include "trained_looking.h"

using namespace dynattn;
using namespace dynattn::branchy_test;
using dynattn::test_util::error_of;
using dynattn::test_util::trained_looking;
using ::testing::HasSubstr;

namespace {
// The stream's results, ordered by id.
EarlyExitResults by_id(const EarlyExitResults& r) {
  const auto order = r.ids.argsort();
  return {r.ids.index_select(0, order), r.logits.index_select(0, order),
          r.exit_index.index_select(0, order)};
}
}  // namespace

TEST(BranchyStream, EqualsPerBatchInferenceWhateverTheBatching) {
  Model m = trained_looking("branchy_resnet20:exits=1.1/2/3.0", 7);
  auto net = branchy_of(m);
  const auto x = small_input(24);
  for (double q : {0.0, 0.3, 0.6, 1.0}) {
    const auto t = mid_thresholds(*net, x, q);
    net->set_thresholds(t);
    const auto want = run(*net, x, ExecutionMode::kCompact);
    for (int64_t min_batch : {1, 4, 7, 100}) {
      SCOPED_TRACE("quantile " + std::to_string(q) + ", min_batch " + std::to_string(min_batch));
      BranchyStream stream(net, min_batch);
      // Uneven batches: queues fill across pushes.
      int64_t from = 0;
      for (int64_t size : {5, 1, 8, 3, 7}) {
        EXPECT_EQ(stream.push(x.slice(0, from, from + size)), from);
        from += size;
        EXPECT_LT(stream.pending(), 3 * min_batch + 8);  // a queue runs once it is full
      }
      ASSERT_EQ(from, 24);
      stream.flush();
      EXPECT_EQ(stream.pending(), 0);
      const auto got = by_id(stream.take());
      EXPECT_TRUE(torch::equal(got.ids, torch::arange(24, torch::kLong)));
      EXPECT_TRUE(torch::equal(got.exit_index, want.exit_index));
      EXPECT_TRUE(torch::allclose(got.logits, want.output, 1e-4, 1e-5));
      EXPECT_EQ(stream.take().ids.size(0), 0);  // taken once
    }
  }
}

TEST(BranchyStream, QueuesWaitForMinBatch) {
  Model m = trained_looking("branchy_resnet20", 7);
  auto net = branchy_of(m);
  net->set_thresholds({kInf, kInf});  // everyone leaves at exit 0: nothing queues
  BranchyStream all_leave(net, 4);
  all_leave.push(small_input(6));
  EXPECT_EQ(all_leave.pending(), 0);
  EXPECT_EQ(all_leave.take().ids.size(0), 6);

  net->set_thresholds({0, 0});  // nobody leaves early: everyone waits for segment 1
  BranchyStream none_leave(net, 10);
  none_leave.push(small_input(6));
  EXPECT_EQ(none_leave.pending(), 6);
  EXPECT_EQ(none_leave.take().ids.size(0), 0);
  none_leave.push(small_input(6));  // 12 >= 10: segment 1 runs, then segment 2 at once
  EXPECT_EQ(none_leave.pending(), 0);
  const auto twelve = none_leave.take();
  EXPECT_TRUE(torch::equal(twelve.exit_index, torch::full({12}, 2, torch::kLong)));
  none_leave.push(small_input(1));
  EXPECT_EQ(none_leave.pending(), 1);
  none_leave.flush();
  const auto r = none_leave.take();
  EXPECT_TRUE(torch::equal(r.ids, torch::full({1}, 12, torch::kLong)));
  EXPECT_TRUE(torch::equal(r.exit_index, torch::full({1}, 2, torch::kLong)));
}

TEST(BranchyStream, Errors) {
  Model m = trained_looking("branchy_resnet20", 7);
  auto net = branchy_of(m);
  EXPECT_THAT(error_of([&] { BranchyStream(net, 0); }),
              HasSubstr("BranchyStream: min_batch must be >= 1, got 0"));
  BranchyStream stream(net, 4);
  EXPECT_THAT(error_of([&] {
                stream.push(torch::zeros({2, 12, 12}));
              }),
              HasSubstr("BranchyStream: expected input [N,C,H,W] with N >= 1"));
  EXPECT_THAT(error_of([&] {
                stream.push(torch::zeros({2, 3, 12, 12}));
              }),
              HasSubstr("BranchyNet: expected input [N,1,H,W]"));
  net->train();
  EXPECT_THAT(error_of([&] {
                stream.push(torch::zeros({2, 1, 12, 12}));
              }),
              HasSubstr("BranchyStream: the model must be in eval mode"));
  net->eval();
}
