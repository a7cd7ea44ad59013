// fusedopt-demo: the program a new user runs first (its commands: cli.cpp).
#include "cli.hpp"

int main(int argc, char** argv) { return fo::demo::run_demo(argc, argv); }
