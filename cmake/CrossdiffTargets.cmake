# One library target per module: crossdiff_add_library(NAME SOURCES ... DEPS ... [TORCH])
# TORCH marks modules that use LibTorch; they share one precompiled header.
set(CROSSDIFF_WARNINGS -Wall -Wextra -Wno-unused-parameter)
if(CROSSDIFF_WERROR)
  list(APPEND CROSSDIFF_WARNINGS -Werror)
endif()
if(CROSSDIFF_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined)
endif()

function(crossdiff_apply_defaults target)
  target_compile_options(${target} PRIVATE ${CROSSDIFF_WARNINGS})
  target_include_directories(${target} PUBLIC ${CMAKE_SOURCE_DIR})
endfunction()

# The shared precompiled header of every LibTorch module (ATen + autograd + nn functional).
add_library(crossdiff_torch_pch OBJECT ${CMAKE_SOURCE_DIR}/cmake/pch_dummy.cc)
target_link_libraries(crossdiff_torch_pch PUBLIC crossdiff_torch absl::status absl::statusor)
target_compile_options(crossdiff_torch_pch PRIVATE ${CROSSDIFF_WARNINGS})
target_precompile_headers(crossdiff_torch_pch PRIVATE ${CMAKE_SOURCE_DIR}/cmake/torch_pch.h)

function(crossdiff_add_library name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  crossdiff_apply_defaults(${name})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
  if(ARG_TORCH)
    target_link_libraries(${name} PUBLIC crossdiff_torch)
    target_precompile_headers(${name} REUSE_FROM crossdiff_torch_pch)
  endif()
endfunction()

# crossdiff_add_test(NAME SOURCES ... DEPS ... [TORCH] [LABELS ...] [TIMEOUT s])
function(crossdiff_add_test name)
  cmake_parse_arguments(ARG "TORCH" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  crossdiff_apply_defaults(${name})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  target_compile_definitions(${name} PRIVATE
    CROSSDIFF_SOURCE_DIR="${CMAKE_SOURCE_DIR}"
    CROSSDIFF_BINARY_DIR="${CMAKE_BINARY_DIR}")
  if(ARG_TORCH)
    target_link_libraries(${name} PRIVATE crossdiff_torch)
    target_precompile_headers(${name} REUSE_FROM crossdiff_torch_pch)
  endif()
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  add_test(NAME ${name} COMMAND ${name} WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  set_tests_properties(${name} PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS "${ARG_LABELS}"
    ENVIRONMENT "CROSSDIFF_FIXTURES=${CROSSDIFF_FIXTURES_DIR};OMP_NUM_THREADS=1")
endfunction()

# Sources of hot vector loops (the crosscoder's sparse kernels and the benchmark's references to
# them): vectorisation beyond -O2's cheap model, and -fno-math-errno so that sqrt vectorises (IEEE
# sqrt is exact either way: results are unchanged). The flags would invalidate the shared
# precompiled header, which these files do not need.
function(crossdiff_vector_kernel_sources)
  set_source_files_properties(${ARGN} PROPERTIES
    COMPILE_OPTIONS "-O3;-fopenmp-simd;-fno-math-errno" SKIP_PRECOMPILE_HEADERS ON)
endfunction()
