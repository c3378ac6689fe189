//! evald evaluates vendors' 3D medical-image segmentation models.
//!
//! A vendor drops a TorchScript model into a folder; evald runs it over a held-out CT test
//! set, scores every case against the reference labels, writes an Excel report and a
//! `summary.json` next to the submission and emails the team.
//!
//! # Layout (data flows top to bottom)
//! - [`config`]: the admin's TOML, raw -> validated [`config::Settings`];
//! - [`files`]: opening files others control (regular files only, bounded reads) and
//!   creating outputs others read (umask, not 0600);
//! - [`dataset`]: test-set folders, case pairing (nnU-Net naming);
//! - [`manifest`]: the vendor's `submission.toml`;
//! - [`volume`]: NIfTI reading/writing with limits, grids and reorientation;
//! - [`infer`]: TorchScript inference (2D slices, 3D sliding window), devices;
//! - [`pipeline`]: one evaluation: predict and score cases concurrently;
//! - [`pool`], [`worker`], [`sandbox`]: inference in supervised, sandboxed worker processes;
//! - [`metrics`]: every number in METRICS.md, and `summary.json`;
//! - [`evaluation`]: the result of an evaluation as every output sees it;
//! - [`submission`]: one vendor submission folder: validate, evaluate, write outputs;
//! - [`report`]: the Excel workbook;
//! - [`plot`]: the Dice box/strip plot (PNG) for the report and the email;
//! - [`mail`]: the summary email and its durable outbox;
//! - [`phantom`]: generated CT-like data and a generated model (demo, tests, benches);
//! - [`watch`]: the drop folder: which submission folders exist, when each is complete;
//! - [`store`]: the SQLite record of every submission and its state;
//! - [`daemon`]: the service (`evald serve`), signals, systemd, admin commands;
//! - [`logging`]: stderr for commands, rolling files + stderr for the service;
//! - [`cli`]: the command line.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataset;
pub mod evaluation;
pub mod files;
pub mod infer;
pub mod logging;
pub mod mail;
pub mod manifest;
pub mod metrics;
pub mod phantom;
pub mod pipeline;
pub mod plot;
pub mod pool;
pub mod report;
pub mod sandbox;
pub mod store;
pub mod submission;
pub mod volume;
pub mod watch;
pub mod worker;
