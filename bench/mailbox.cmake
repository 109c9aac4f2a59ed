# tt-mailbox-bench: mailbox throughput with 2, 16 and 128 producer threads
# into one consumer actor, against a single shared ck_ring (MPSC enqueue).
# Included from bench/CMakeLists.txt; runs by itself in under 30 s.
add_executable(tt-mailbox-bench ${CMAKE_CURRENT_LIST_DIR}/mailbox_bench.c
               $<TARGET_OBJECTS:tt_runtime> $<TARGET_OBJECTS:tt_util>)
target_link_libraries(tt-mailbox-bench PRIVATE tt_runtime tt_util)
