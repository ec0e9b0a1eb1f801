//! Black-box tests: the real `spillway` binary on port 0, real sockets, a
//! temporary data directory per server. One test binary, one module per area.

mod harness;

mod admin;
mod durability;
mod guard;
mod multihub;
mod ops;
mod publish;
mod readers;
mod services;
mod slow_readers;
mod storm;
mod transports;
