#include "core/data/chat_format.h"

#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace crossdiff::data {
namespace {

using ::testing::HasSubstr;

std::vector<ChatMessage> Conversation() {
  return {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello!"}};
}

TEST(ChatFormatTest, RendersGemmaWithSystemFoldedIntoUser) {
  auto s = RenderChat(ChatFormat::kGemma, Conversation());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
            "<start_of_turn>model\nHello!<end_of_turn>\n");
}

TEST(ChatFormatTest, RendersLlama3) {
  auto s = RenderChat(ChatFormat::kLlama3, {{"user", " Hi \n"}, {"assistant", "Hello!"}});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s,
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>");
}

TEST(ChatFormatTest, RendersChatML) {
  auto s = RenderChat(ChatFormat::kChatML, Conversation());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n");
}

TEST(ChatFormatTest, RejectsUnknownRoleAndEmptyChat) {
  auto bad = RenderChat(ChatFormat::kChatML, {{"tool", "x"}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("unknown chat role \"tool\""));
  EXPECT_EQ(RenderChat(ChatFormat::kGemma, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ChatFormatTest, ParsesNames) {
  EXPECT_EQ(*ParseChatFormat("gemma"), ChatFormat::kGemma);
  EXPECT_EQ(*ParseChatFormat("Llama-3"), ChatFormat::kLlama3);
  EXPECT_EQ(*ParseChatFormat("chatml"), ChatFormat::kChatML);
  auto bad = ParseChatFormat("vicuna");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("gemma, llama3, chatml"));
}

TEST(ChatFormatTest, DetectsFromTokenizerConfig) {
  namespace fs = std::filesystem;
  fs::path dir = fs::path(::testing::TempDir()) / "chat_format_detect";
  fs::create_directories(dir);
  auto write = [&](const std::string& json) {
    std::ofstream(dir / "tokenizer_config.json") << json;
  };
  write(R"({"chat_template": "{{ bos_token }}{% for m in messages %}<start_of_turn>..."})");
  EXPECT_EQ(*DetectChatFormat(dir.string()), ChatFormat::kGemma);
  write(R"({"chat_template": "<|start_header_id|>{{ role }}<|end_header_id|>"})");
  EXPECT_EQ(*DetectChatFormat(dir.string()), ChatFormat::kLlama3);
  write(R"({"chat_template": [{"name": "tool_use", "template": "x"},
                              {"name": "default", "template": "<|im_start|>"}]})");
  EXPECT_EQ(*DetectChatFormat(dir.string()), ChatFormat::kChatML);
  write(R"({"chat_template": "[INST] {{ m }} [/INST]"})");
  auto unknown = DetectChatFormat(dir.string());
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(unknown.status().message(), HasSubstr("--chat-format"));
  write(R"({"bos_token": "<s>"})");
  EXPECT_THAT(DetectChatFormat(dir.string()).status().message(), HasSubstr("no chat_template"));
}

}  // namespace
}  // namespace crossdiff::data
