//! evald evaluates vendors' 3D medical-image segmentation models.
//!
//! A vendor drops a model into a folder; evald runs it over a held-out CT test set,
//! scores every case against the reference labels, writes an Excel report and a
//! `summary.json` next to the submission and emails the team.
//!
//! # Layers (each imports only from the layers below it; no two modules import each other)
//! Edges: the service and the command line.
//! - [`daemon`]: the service (`evald serve`), signals, systemd, admin commands;
//! - [`cli`]: the command line (raw arguments -> the library);
//! - [`worker`]: the inside of one sandboxed worker process (`evald worker`).
//!
//! Submissions and their outputs.
//! - [`watch`]: the drop folder: which submission folders exist, when each is complete;
//! - [`submission`]: one vendor submission folder: validate, the execution job it asks
//!   for, evaluate, write outputs;
//! - [`mail`]: the summary email and its durable outbox;
//! - [`report`]: the Excel workbook; [`plot`]: the Dice box/strip plot (PNG);
//! - [`manifest`]: the vendor's `submission.toml`.
//!
//! One evaluation.
//! - [`pipeline`]: predict and score cases concurrently, on any execution backend;
//! - [`evaluation`]: the result of an evaluation as every output sees it, and
//!   `summary.json`;
//! - [`metrics`]: every number in METRICS.md, case by case and aggregated;
//! - [`stats`]: inferential statistics on plain numbers (paired bootstrap, Wilcoxon,
//!   McNemar, Clopper-Pearson), each matching a named peer; imports nothing of evald's.
//!
//! Execution (knows nothing of submissions, reports or mail).
//! - [`backend`]: which execution backend runs an evaluation (today the local pool);
//! - [`exec`]: the backend interface the pipeline calls ([`exec::Backend`], [`exec::Job`]);
//! - [`pool`]: the supervised local worker pool; [`sandbox`]: what a worker may still do;
//! - [`infer`]: model formats and their runtimes (TorchScript via libtorch), the
//!   runtime-neutral windowing and tiling, devices.
//!
//! Foundations.
//! - [`config`]: the admin's TOML, raw -> validated [`config::Settings`];
//! - [`layout`]: the drop folder's layout `<task>/<vendor>/<name>` and its file names;
//! - [`dataset`]: test-set folders, case pairing (nnU-Net naming);
//! - [`volume`]: NIfTI reading/writing with limits, grids and reorientation;
//! - [`dicom`]: DICOM test sets (CT series, SEG, RTSTRUCT) read exactly or refused, and
//!   imported into the NIfTI layout above (uses `volume` and `files` only);
//! - [`testset`]: a task's test set made ready for evaluation: a `format = "dicom"` task
//!   imported through the decoded-case cache into its NIfTI view (config + dicom, above both);
//! - [`files`]: opening files others control (regular files only, bounded reads) and
//!   creating outputs others read (umask, not 0600);
//! - [`store`]: the SQLite record of every submission and its state;
//! - [`logging`]: stderr for commands, rolling files + stderr for the service;
//! - [`phantom`]: generated CT-like data and a generated model (demo, tests, benches).

pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataset;
pub mod dicom;
pub mod evaluation;
pub mod exec;
pub mod files;
pub mod infer;
pub mod layout;
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
pub mod stats;
pub mod store;
pub mod submission;
pub mod testset;
pub mod volume;
pub mod watch;
pub mod worker;
