//! The edge gateway as a library: device links in, SQLite store, (next) MQTT bridge out.
//!
//! [`app::serve`] takes a bound listener, a validated [`config::Config`] and a shutdown token;
//! `main.rs` is a thin shell around it that reads files, parses the command line and installs
//! signal handlers.

pub mod admin;
pub mod anomaly;
pub mod api;
pub mod app;
pub mod auth;
pub mod bridge;
pub mod broker;
pub mod ceiling;
pub mod commands;
pub mod config;
pub mod limits;
pub mod link;
pub mod live;
pub mod metrics;
pub mod pacing;
pub mod payload;
pub mod preflight;
pub mod registry;
pub mod reload;
pub mod service;
pub mod session;
pub mod stats;
pub mod store;
pub mod tls;
