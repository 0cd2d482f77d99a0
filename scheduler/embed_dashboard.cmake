# Turns the dashboard page into a C++ source file defining shoal::scheduler::DashboardHtml(), so
# the coordinator binary serves the page with no files beside it. Run by scheduler/CMakeLists.txt:
#   cmake -DINPUT=dashboard.html -DOUTPUT=dashboard_html.cc -P embed_dashboard.cmake
file(READ "${INPUT}" page)
set(delimiter "shoal_page")  # a raw-string delimiter has at most 16 characters
string(FIND "${page}" ")${delimiter}\"" clash)
if(NOT clash EQUAL -1)
  message(FATAL_ERROR "${INPUT} contains the raw-string delimiter )${delimiter}\"")
endif()
file(WRITE "${OUTPUT}"
"// Generated from ${INPUT} by embed_dashboard.cmake. Do not edit.
#include <string>

#include \"scheduler/http_status.h\"

namespace shoal::scheduler {

const std::string& DashboardHtml() {
  static const std::string* const page = new std::string(R\"${delimiter}(${page})${delimiter}\");
  return *page;
}

}  // namespace shoal::scheduler
")
