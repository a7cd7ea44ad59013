// docs/optimizers.md against the registry: every registered optimizer has a section whose
// option table lists exactly its options, in order, with its defaults, and whose "States:"
// line names exactly the states it may keep. A change to an optimizer's options or states
// that leaves its documentation behind fails here.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "fusedopt/fusedopt.hpp"

#ifndef FUSEDOPT_DOCS_DIR
#error "FUSEDOPT_DOCS_DIR must name docs/"
#endif

namespace fo::test {
namespace {

struct DocSection {
  std::vector<std::pair<std::string, std::string>> options;  // (key, default as written)
  std::vector<std::string> states;
  bool has_states_line = false;
};

/// The sections of docs/optimizers.md by their "## name" heading.
std::map<std::string, DocSection> read_sections() {
  std::ifstream f(std::string(FUSEDOPT_DOCS_DIR) + "/optimizers.md");
  std::map<std::string, DocSection> out;
  DocSection* cur = nullptr;
  const std::regex heading(R"(^## (\S+)\s*$)");
  const std::regex row(R"(^\| `([a-z_0-9]+)` \| ([^|]+?) \|$)");
  const std::regex name(R"(`([a-z_0-9]+)`)");
  std::string line;
  std::smatch m;
  while (std::getline(f, line)) {
    if (std::regex_match(line, m, heading)) {
      cur = &out[m[1]];
    } else if (cur && std::regex_match(line, m, row)) {
      cur->options.emplace_back(m[1], m[2]);
    } else if (cur && line.rfind("States:", 0) == 0) {
      cur->has_states_line = true;
      for (auto it = std::sregex_iterator(line.begin(), line.end(), name);
           it != std::sregex_iterator(); ++it)
        cur->states.push_back((*it)[1]);
    }
  }
  return out;
}

TEST(DocsTest, OptimizerTablesMatchTheRegistry) {
  const auto sections = read_sections();
  ASSERT_FALSE(sections.empty()) << "docs/optimizers.md is missing or has no sections";
  for (const auto& algo : dense_algorithms()) {
    SCOPED_TRACE(algo.name);
    const auto it = sections.find(algo.name);
    ASSERT_NE(it, sections.end()) << "docs/optimizers.md has no section '## " << algo.name << "'";
    const DocSection& d = it->second;
    ASSERT_EQ(d.options.size(), algo.options.size()) << "the option table's rows";
    for (std::size_t k = 0; k < algo.options.size(); ++k) {
      EXPECT_EQ(d.options[k].first, algo.options[k]) << "option " << k;
      double written = 0.0;
      std::istringstream(d.options[k].second) >> written;
      EXPECT_EQ(written, algo.defaults[k])
          << algo.options[k] << "'s default is documented as " << d.options[k].second;
    }
    EXPECT_TRUE(d.has_states_line) << "no 'States:' line";
    EXPECT_EQ(d.states, algo.states) << "the 'States:' line";
  }
}

}  // namespace
}  // namespace fo::test
