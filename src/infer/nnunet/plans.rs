//! An nnU-Net v2 trained-model folder's description, read and checked: the folder name
//! (`<trainer>__<plans>__<configuration>`), `plans.json`, `dataset.json` and the folds
//! present. Everything later stages need is here as typed values; anything evald does not
//! reproduce (custom trainers, architectures, normalisations, readers, cascades) is refused
//! here, by name, before a checkpoint is opened.
//!
//! nnunetv2 2.8.1 references: `utilities/plans_handling/plans_handler.py` (configurations,
//! `inherits_from`), `utilities/label_handling/label_handling.py` (labels and regions),
//! `utilities/get_network_from_plans.py` (architecture keywords).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The plans' and dataset's files in a trained-model folder.
pub const PLANS_JSON: &str = "plans.json";
/// See [`PLANS_JSON`].
pub const DATASET_JSON: &str = "dataset.json";
/// The checkpoint nnU-Net's predictor loads by default, in each `fold_N/`.
pub const CHECKPOINT: &str = "checkpoint_final.pth";

/// Trainers whose inference is stock nnU-Net: they differ from `nnUNetTrainer` only in
/// training (epochs, learning rate, augmentation) or in the mirroring axes, which the
/// checkpoint records. Anything else may build another network or predict differently.
const STOCK_TRAINERS: &[&str] = &[
    "nnUNetTrainer",
    "nnUNetTrainerNoMirroring",
    "nnUNetTrainer_onlyMirror01",
    "nnUNetTrainerNoDA",
    "nnUNetTrainerNoDeepSupervision",
    "nnUNetTrainerDiceCELoss_noSmooth",
];

/// What evald supports, for refusals.
pub const SUPPORTED: &str = "stock nnU-Net v2 trained-model folders: trainer nnUNetTrainer (or a \
    training-only variant: _<N>epochs, NoMirroring, NoDA, ...), DefaultPreprocessor, SimpleITKIO, \
    PlainConvUNet or ResidualEncoderUNet with InstanceNorm and LeakyReLU, CTNormalization or \
    ZScoreNormalization, one input channel, 2d or 3d_fullres/3d_lowres (no cascade), \
    fold_N/checkpoint_final.pth";

/// Why a folder cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum PlansError {
    /// A file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not the JSON nnU-Net writes.
    #[error("{path}: not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A key is missing or has the wrong type.
    #[error("{path}: {key}: {problem}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Dotted key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// Something valid for nnU-Net that evald does not reproduce.
    #[error("{path}: {what} is not supported; evald runs {SUPPORTED}")]
    Unsupported {
        /// The file or folder.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// The folder's name is not nnU-Net's `<trainer>__<plans>__<configuration>`.
    #[error("{path}: not an nnU-Net trained-model folder name (expected <trainer>__<plans>__<configuration>, e.g. nnUNetTrainer__nnUNetPlans__3d_fullres)")]
    FolderName {
        /// The folder.
        path: PathBuf,
    },
    /// No `fold_N/checkpoint_final.pth`.
    #[error("{path}: no fold_N/{CHECKPOINT} in the folder (export the model with nnUNetv2_export_model_to_zip and unpack it, or copy the trained fold folders)")]
    NoFolds {
        /// The folder.
        path: PathBuf,
    },
}

/// Intensity normalisation of a channel (`preprocessing/normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// Clip to the training foreground's 0.5 / 99.5 percentiles, then z-score with its
    /// mean and std.
    Ct,
    /// Z-score with the image's own mean and std (inside the non-zero mask when
    /// `use_mask_for_norm`).
    ZScore,
}

/// Training foreground intensity statistics of a channel (CTNormalization's inputs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intensity {
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
    /// 0.5th percentile.
    pub percentile_00_5: f64,
    /// 99.5th percentile.
    pub percentile_99_5: f64,
}

/// One resampling's settings (`resampling_fn_*_kwargs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resampling {
    /// Spline order in plane (or in 3D).
    pub order: usize,
    /// Order along the separate (low-resolution) axis.
    pub order_z: usize,
    /// `Some` forces (or forbids) a separate axis; `None` decides by the anisotropy rule.
    pub force_separate_z: Option<bool>,
}

/// The network class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchKind {
    /// `dynamic_network_architectures.architectures.unet.PlainConvUNet`.
    PlainConvUNet,
    /// `dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`.
    ResidualEncoderUNet,
}

/// The network's shape, from `architecture.arch_kwargs`. Convolutions are 2D or 3D by
/// `kernel_sizes`' inner length; norms are instance norms; nonlinearities leaky ReLUs.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// Class.
    pub kind: ArchKind,
    /// Encoder stages.
    pub n_stages: usize,
    /// Channels per stage.
    pub features_per_stage: Vec<usize>,
    /// Kernel per stage (2 or 3 entries each).
    pub kernel_sizes: Vec<Vec<usize>>,
    /// Stride per stage (the first conv of a stage carries it).
    pub strides: Vec<Vec<usize>>,
    /// Convolutions (PlainConvUNet) or residual blocks (ResidualEncoderUNet) per encoder stage.
    pub n_per_stage: Vec<usize>,
    /// Convolutions per decoder stage.
    pub n_conv_per_stage_decoder: Vec<usize>,
    /// Whether convolutions have a bias.
    pub conv_bias: bool,
    /// Instance norm epsilon.
    pub norm_eps: f64,
    /// Instance norm has a learnt scale and shift.
    pub norm_affine: bool,
    /// Leaky ReLU slope (0 for ReLU).
    pub negative_slope: f64,
}

impl Architecture {
    /// 2 or 3.
    pub fn dims(&self) -> usize {
        self.kernel_sizes.first().map_or(3, Vec::len)
    }
}

/// The configuration being run, with `inherits_from` resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Configuration {
    /// Its name (`3d_fullres`).
    pub name: String,
    /// Sliding-window patch, in the transposed (network) axis order.
    pub patch_size: Vec<usize>,
    /// Target spacing, transposed axis order (z, y, x for the default transpose).
    pub spacing: Vec<f64>,
    /// Per input channel.
    pub normalization: Vec<Normalization>,
    /// Per input channel.
    pub use_mask_for_norm: Vec<bool>,
    /// How the image is resampled to `spacing`.
    pub resampling_data: Resampling,
    /// How predicted probabilities are resampled back.
    pub resampling_probabilities: Resampling,
    /// The network.
    pub architecture: Architecture,
}

/// Label handling from `dataset.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    /// One output channel per class; the label is the argmax (first maximum wins).
    Classes {
        /// Number of output channels, background included.
        num_classes: usize,
    },
    /// Region-based training: one sigmoid channel per region, painted in
    /// `regions_class_order` where the probability exceeds 0.5.
    Regions {
        /// The label painted for each output channel, in order.
        class_order: Vec<u8>,
    },
}

impl Labels {
    /// Output channels of the network.
    pub fn channels(&self) -> usize {
        match self {
            Labels::Classes { num_classes } => *num_classes,
            Labels::Regions { class_order } => class_order.len(),
        }
    }
}

/// A checked nnU-Net v2 trained-model folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Trainer class name.
    pub trainer: String,
    /// Plans identifier (`nnUNetPlans`, `nnUNetResEncUNetMPlans`).
    pub plans_name: String,
    /// Axis permutation into the network's order.
    pub transpose_forward: [usize; 3],
    /// Its inverse.
    pub transpose_backward: [usize; 3],
    /// Per input channel.
    pub intensity: Vec<Intensity>,
    /// The configuration.
    pub configuration: Configuration,
    /// Labels or regions.
    pub labels: Labels,
    /// `fold_N` numbers present, ascending, with their checkpoint.
    pub folds: Vec<(usize, PathBuf)>,
}

/// Whether `dir` looks like an nnU-Net trained-model folder (for format detection): it
/// holds `plans.json`, `dataset.json` and at least one `fold_*` folder.
pub fn looks_like(dir: &Path) -> bool {
    dir.join(PLANS_JSON).is_file()
        && dir.join(DATASET_JSON).is_file()
        && std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("fold_") && e.path().is_dir())
        })
}

impl ModelFolder {
    /// Read and check the folder `dir`: its name, `plans.json`, `dataset.json`, and the
    /// folds present. `folds` restricts to those fold numbers (nnU-Net's `-f`); `None`
    /// takes every `fold_N` with a checkpoint, as nnU-Net's `-f` default does not (it
    /// asks for 0-4) but a delivered folder holds exactly the folds meant to be used.
    ///
    /// # Errors
    /// [`PlansError`] naming the file and key for anything unreadable, malformed or not
    /// stock.
    pub fn open(dir: &Path, folds: Option<&[usize]>) -> Result<Self, PlansError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parts: Vec<&str> = name.split("__").collect();
        let [trainer, plans_id, config_name] = parts[..] else {
            return Err(PlansError::FolderName { path: dir.into() });
        };
        if !stock_trainer(trainer) {
            return Err(PlansError::Unsupported {
                path: dir.into(),
                what: format!("trainer {trainer:?}"),
            });
        }
        let plans_path = dir.join(PLANS_JSON);
        let plans = read_json(&plans_path)?;
        let dataset_path = dir.join(DATASET_JSON);
        let dataset = read_json(&dataset_path)?;
        let p = Json {
            path: &plans_path,
            v: &plans,
            at: String::new(),
        };
        let plans_name = p.str("plans_name")?;
        if plans_name != plans_id {
            return Err(p.err(
                "plans_name",
                format!("{plans_name:?}, but the folder name says {plans_id:?}"),
            ));
        }
        let reader = p.str("image_reader_writer")?;
        if reader != "SimpleITKIO" {
            return Err(p.unsupported(format!("image_reader_writer {reader:?}")));
        }
        let lm = p.opt("label_manager").map(|v| v.as_str().unwrap_or(""));
        if lm.is_some_and(|l| l != "LabelManager") {
            return Err(p.unsupported(format!("label_manager {:?}", lm.unwrap_or(""))));
        }
        let transpose_forward = perm3(&p, "transpose_forward")?;
        let transpose_backward = perm3(&p, "transpose_backward")?;
        let configuration = configuration(&plans_path, &plans, config_name)?;

        let d = Json {
            path: &dataset_path,
            v: &dataset,
            at: String::new(),
        };
        let channels = d.obj("channel_names")?.len();
        if channels != 1 {
            return Err(d.unsupported(format!(
                "{channels} input channels (evald feeds one CT image per case)"
            )));
        }
        let labels = labels(&d)?;

        let mut intensity = Vec::new();
        for ch in 0..channels {
            let c = p.child(
                "foreground_intensity_properties_per_channel",
                &ch.to_string(),
            )?;
            intensity.push(Intensity {
                mean: c.f64("mean")?,
                std: c.f64("std")?,
                percentile_00_5: c.f64("percentile_00_5")?,
                percentile_99_5: c.f64("percentile_99_5")?,
            });
        }
        if configuration.normalization.len() != channels
            || configuration.use_mask_for_norm.len() != channels
        {
            return Err(PlansError::Key {
                path: plans_path,
                key: format!("configurations.{config_name}.normalization_schemes"),
                problem: format!("one entry per input channel ({channels}) expected"),
            });
        }

        let mut found = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let Some(k) = n
                    .strip_prefix("fold_")
                    .and_then(|k| k.parse::<usize>().ok())
                else {
                    continue;
                };
                let ck = e.path().join(CHECKPOINT);
                if ck.is_file() && folds.is_none_or(|f| f.contains(&k)) {
                    found.push((k, ck));
                }
            }
        }
        found.sort();
        if found.is_empty() {
            return Err(PlansError::NoFolds { path: dir.into() });
        }
        Ok(ModelFolder {
            dir: dir.into(),
            trainer: trainer.into(),
            plans_name,
            transpose_forward,
            transpose_backward,
            intensity,
            configuration,
            labels,
            folds: found,
        })
    }
}

/// `nnUNetTrainer`, a stock training-only variant, or `nnUNetTrainer_<N>epochs`.
fn stock_trainer(t: &str) -> bool {
    STOCK_TRAINERS.contains(&t)
        || t.strip_prefix("nnUNetTrainer_")
            .and_then(|r| r.strip_suffix("epochs"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn read_json(path: &Path) -> Result<Value, PlansError> {
    // Plans are a few kB; a bound keeps a hostile file from filling memory.
    const MAX: u64 = 4 << 20;
    let f = std::fs::File::open(path).map_err(|source| PlansError::Read {
        path: path.into(),
        source,
    })?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX + 1), &mut text).map_err(
        |source| PlansError::Read {
            path: path.into(),
            source,
        },
    )?;
    if text.len() as u64 > MAX {
        return Err(PlansError::Key {
            path: path.into(),
            key: String::new(),
            problem: format!("file larger than {MAX} bytes"),
        });
    }
    serde_json::from_str(&text).map_err(|source| PlansError::Json {
        path: path.into(),
        source,
    })
}

/// A JSON object being read, with its file and dotted position for messages.
struct Json<'a> {
    path: &'a Path,
    v: &'a Value,
    at: String,
}

impl<'a> Json<'a> {
    fn key(&self, k: &str) -> String {
        if self.at.is_empty() {
            k.into()
        } else {
            format!("{}.{k}", self.at)
        }
    }

    fn err(&self, k: &str, problem: impl Into<String>) -> PlansError {
        PlansError::Key {
            path: self.path.into(),
            key: self.key(k),
            problem: problem.into(),
        }
    }

    fn unsupported(&self, what: String) -> PlansError {
        PlansError::Unsupported {
            path: self.path.into(),
            what,
        }
    }

    fn opt(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k).filter(|v| !v.is_null())
    }

    fn get(&self, k: &str) -> Result<&'a Value, PlansError> {
        self.v.get(k).ok_or_else(|| self.err(k, "missing"))
    }

    fn str(&self, k: &str) -> Result<String, PlansError> {
        self.get(k)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.err(k, "a string expected"))
    }

    fn f64(&self, k: &str) -> Result<f64, PlansError> {
        self.get(k)?
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.err(k, "a finite number expected"))
    }

    fn usize(&self, k: &str) -> Result<usize, PlansError> {
        self.get(k)?
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.err(k, "a non-negative integer expected"))
    }

    fn bool(&self, k: &str) -> Result<bool, PlansError> {
        self.get(k)?
            .as_bool()
            .ok_or_else(|| self.err(k, "true or false expected"))
    }

    fn obj(&self, k: &str) -> Result<&'a Map<String, Value>, PlansError> {
        self.get(k)?
            .as_object()
            .ok_or_else(|| self.err(k, "an object expected"))
    }

    fn child(&self, k: &str, k2: &str) -> Result<Json<'a>, PlansError> {
        let o = self.obj(k)?;
        let v = o
            .get(k2)
            .ok_or_else(|| self.err(&format!("{k}.{k2}"), "missing"))?;
        Ok(Json {
            path: self.path,
            v,
            at: self.key(&format!("{k}.{k2}")),
        })
    }

    fn sub(&self, k: &str) -> Result<Json<'a>, PlansError> {
        let v = self.get(k)?;
        if !v.is_object() {
            return Err(self.err(k, "an object expected"));
        }
        Ok(Json {
            path: self.path,
            v,
            at: self.key(k),
        })
    }

    fn usizes(&self, k: &str) -> Result<Vec<usize>, PlansError> {
        let a = self
            .get(k)?
            .as_array()
            .ok_or_else(|| self.err(k, "a list expected"))?;
        a.iter()
            .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.err(k, "a list of non-negative integers expected"))
    }

    fn f64s(&self, k: &str) -> Result<Vec<f64>, PlansError> {
        let a = self
            .get(k)?
            .as_array()
            .ok_or_else(|| self.err(k, "a list expected"))?;
        a.iter()
            .map(|x| x.as_f64().filter(|x| x.is_finite() && *x > 0.0))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.err(k, "a list of positive numbers expected"))
    }

    fn nested(&self, k: &str) -> Result<Vec<Vec<usize>>, PlansError> {
        let a = self
            .get(k)?
            .as_array()
            .ok_or_else(|| self.err(k, "a list of lists expected"))?;
        a.iter()
            .map(|row| {
                row.as_array().and_then(|r| {
                    r.iter()
                        .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
                        .collect::<Option<Vec<_>>>()
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.err(k, "a list of lists of non-negative integers expected"))
    }
}

fn perm3(p: &Json<'_>, k: &str) -> Result<[usize; 3], PlansError> {
    let v = p.usizes(k)?;
    let mut seen = [false; 3];
    match v[..] {
        [a, b, c]
            if [a, b, c]
                .iter()
                .all(|&i| i < 3 && !std::mem::replace(&mut seen[i], true)) =>
        {
            Ok([a, b, c])
        }
        _ => Err(p.err(k, "a permutation of [0, 1, 2] expected")),
    }
}

/// The configuration `name`, with its `inherits_from` chain merged (the child's keys win,
/// as `plans_handler.py` does), checked.
fn configuration(path: &Path, plans: &Value, name: &str) -> Result<Configuration, PlansError> {
    let configs = plans
        .get("configurations")
        .and_then(Value::as_object)
        .ok_or_else(|| PlansError::Key {
            path: path.into(),
            key: "configurations".into(),
            problem: "an object expected".into(),
        })?;
    let mut chain: Vec<&Map<String, Value>> = Vec::new();
    let mut cur = name.to_string();
    loop {
        let c = configs
            .get(&cur)
            .and_then(Value::as_object)
            .ok_or_else(|| PlansError::Key {
                path: path.into(),
                key: format!("configurations.{cur}"),
                problem: format!(
                    "no such configuration (the folder name asks for {name:?}; plans have {:?})",
                    configs.keys().collect::<Vec<_>>()
                ),
            })?;
        chain.push(c);
        if chain.len() > configs.len() {
            return Err(PlansError::Key {
                path: path.into(),
                key: format!("configurations.{name}.inherits_from"),
                problem: "inherits in a cycle".into(),
            });
        }
        match c.get("inherits_from").and_then(Value::as_str) {
            Some(parent) => cur = parent.to_string(),
            None => break,
        }
    }
    let mut merged = Map::new();
    for c in chain.iter().rev() {
        for (k, v) in c.iter() {
            merged.insert(k.clone(), v.clone());
        }
    }
    let merged = Value::Object(merged);
    let c = Json {
        path,
        v: &merged,
        at: format!("configurations.{name}"),
    };
    // A cascade's second stage needs the first stage's segmentation as input.
    if c.opt("previous_stage").is_some() || name.contains("cascade") {
        return Err(c.unsupported(format!("cascade configuration {name:?}")));
    }
    let pre = c
        .opt("preprocessor_name")
        .and_then(Value::as_str)
        .unwrap_or("DefaultPreprocessor");
    if pre != "DefaultPreprocessor" {
        return Err(c.unsupported(format!("preprocessor {pre:?}")));
    }
    for k in ["resampling_fn_data", "resampling_fn_probabilities"] {
        let f = c.str(k)?;
        if f != "resample_data_or_seg_to_shape" {
            return Err(c.unsupported(format!("{k} {f:?}")));
        }
    }
    let normalization = c
        .get("normalization_schemes")?
        .as_array()
        .ok_or_else(|| c.err("normalization_schemes", "a list expected"))?
        .iter()
        .map(|s| match s.as_str() {
            Some("CTNormalization") => Ok(Normalization::Ct),
            Some("ZScoreNormalization") => Ok(Normalization::ZScore),
            other => Err(c.unsupported(format!("normalization {other:?}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let use_mask_for_norm = c
        .get("use_mask_for_norm")?
        .as_array()
        .ok_or_else(|| c.err("use_mask_for_norm", "a list expected"))?
        .iter()
        .map(|b| {
            b.as_bool()
                .ok_or_else(|| c.err("use_mask_for_norm", "booleans expected"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let patch_size = c.usizes("patch_size")?;
    let spacing = c.f64s("spacing")?;
    let resampling_data = resampling(&c.sub("resampling_fn_data_kwargs")?)?;
    let resampling_probabilities = resampling(&c.sub("resampling_fn_probabilities_kwargs")?)?;
    let architecture = architecture(&c.sub("architecture")?)?;
    let dims = architecture.dims();
    if patch_size.len() != dims || spacing.len() != dims || !(2..=3).contains(&dims) {
        return Err(c.err(
            "patch_size",
            format!(
                "patch {patch_size:?} and spacing {spacing:?} must both have the network's {dims} dimensions"
            ),
        ));
    }
    if patch_size.iter().any(|&p| p == 0 || p > 1024) {
        return Err(c.err("patch_size", "each side 1..=1024 expected"));
    }
    Ok(Configuration {
        name: name.into(),
        patch_size,
        spacing,
        normalization,
        use_mask_for_norm,
        resampling_data,
        resampling_probabilities,
        architecture,
    })
}

fn resampling(k: &Json<'_>) -> Result<Resampling, PlansError> {
    let order = k.usize("order")?;
    let order_z = k.usize("order_z")?;
    if order > 5 || order_z > 5 {
        return Err(k.err("order", "spline orders 0..=5 expected"));
    }
    let force_separate_z = match k.opt("force_separate_z") {
        None => None,
        Some(v) => Some(
            v.as_bool()
                .ok_or_else(|| k.err("force_separate_z", "null, true or false expected"))?,
        ),
    };
    Ok(Resampling {
        order,
        order_z,
        force_separate_z,
    })
}

fn architecture(a: &Json<'_>) -> Result<Architecture, PlansError> {
    let class = a.str("network_class_name")?;
    let kind = match class.as_str() {
        "dynamic_network_architectures.architectures.unet.PlainConvUNet" => ArchKind::PlainConvUNet,
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet" => {
            ArchKind::ResidualEncoderUNet
        }
        _ => return Err(a.unsupported(format!("network {class:?}"))),
    };
    let k = a.sub("arch_kwargs")?;
    let n_stages = k.usize("n_stages")?;
    let features_per_stage = k.usizes("features_per_stage")?;
    let kernel_sizes = k.nested("kernel_sizes")?;
    let strides = k.nested("strides")?;
    let n_per_stage = match kind {
        ArchKind::PlainConvUNet => k.usizes("n_conv_per_stage")?,
        ArchKind::ResidualEncoderUNet => k.usizes("n_blocks_per_stage")?,
    };
    let n_conv_per_stage_decoder = k.usizes("n_conv_per_stage_decoder")?;
    let conv = k.str("conv_op")?;
    let dims = kernel_sizes.first().map_or(0, Vec::len);
    let want_conv = match dims {
        2 => "torch.nn.modules.conv.Conv2d",
        3 => "torch.nn.modules.conv.Conv3d",
        _ => return Err(k.err("kernel_sizes", "2D or 3D kernels expected")),
    };
    if conv != want_conv {
        return Err(a.unsupported(format!("conv_op {conv:?} with {dims}D kernels")));
    }
    let norm = k.str("norm_op")?;
    let want_norm = format!("torch.nn.modules.instancenorm.InstanceNorm{dims}d");
    if norm != want_norm {
        return Err(a.unsupported(format!("norm_op {norm:?}")));
    }
    if k.opt("dropout_op").is_some() {
        return Err(a.unsupported("dropout_op (nnU-Net's plans never set one)".into()));
    }
    let nonlin = k.str("nonlin")?;
    let nk = k.opt("nonlin_kwargs");
    let negative_slope = match nonlin.as_str() {
        "torch.nn.LeakyReLU" | "torch.nn.modules.activation.LeakyReLU" => nk
            .and_then(|v| v.get("negative_slope"))
            .and_then(Value::as_f64)
            .unwrap_or(0.01),
        "torch.nn.ReLU" | "torch.nn.modules.activation.ReLU" => 0.0,
        _ => return Err(a.unsupported(format!("nonlin {nonlin:?}"))),
    };
    let nok = k.sub("norm_op_kwargs")?;
    let norm_eps = nok.opt("eps").and_then(Value::as_f64).unwrap_or(1e-5);
    let norm_affine = match nok.opt("affine") {
        Some(v) => v
            .as_bool()
            .ok_or_else(|| nok.err("affine", "true or false expected"))?,
        None => false,
    };
    let conv_bias = k.bool("conv_bias")?;
    // Keywords that change the network beyond what is read above.
    for extra in [
        "block",
        "bottleneck_channels",
        "stem_channels",
        "deep_supervision_head",
    ] {
        if k.opt(extra).is_some() {
            return Err(a.unsupported(format!("arch_kwargs.{extra}")));
        }
    }
    // Swaps norm and nonlinearity in every block; stock plans never set it.
    if k.opt("nonlin_first").and_then(Value::as_bool) == Some(true) {
        return Err(a.unsupported("arch_kwargs.nonlin_first = true".into()));
    }
    let arch = Architecture {
        kind,
        n_stages,
        features_per_stage,
        kernel_sizes,
        strides,
        n_per_stage,
        n_conv_per_stage_decoder,
        conv_bias,
        norm_eps,
        norm_affine,
        negative_slope,
    };
    let ok = arch.n_stages >= 1
        && arch.features_per_stage.len() == n_stages
        && arch.kernel_sizes.len() == n_stages
        && arch.strides.len() == n_stages
        && arch.n_per_stage.len() == n_stages
        && arch.n_conv_per_stage_decoder.len() + 1 == n_stages
        && arch
            .kernel_sizes
            .iter()
            .chain(&arch.strides)
            .all(|v| v.len() == dims && v.iter().all(|&x| (1..=16).contains(&x)))
        && arch
            .features_per_stage
            .iter()
            .all(|&f| (1..=4096).contains(&f))
        && arch
            .n_per_stage
            .iter()
            .chain(&arch.n_conv_per_stage_decoder)
            .all(|&n| (1..=16).contains(&n));
    if !ok {
        return Err(k.err(
            "n_stages",
            "features_per_stage, kernel_sizes, strides and the per-stage counts must have n_stages entries \
             (the decoder one fewer), sizes 1..=16, features 1..=4096",
        ));
    }
    Ok(arch)
}

fn labels(d: &Json<'_>) -> Result<Labels, PlansError> {
    let map = d.obj("labels")?;
    let mut values: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut region = false;
    for (name, v) in map {
        let ids = match v {
            Value::Number(n) => vec![n
                .as_i64()
                .ok_or_else(|| d.err(&format!("labels.{name}"), "an integer expected"))?],
            Value::Array(a) => {
                region = true;
                a.iter()
                    .map(Value::as_i64)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| d.err(&format!("labels.{name}"), "integers expected"))?
            }
            _ => {
                return Err(d.err(
                    &format!("labels.{name}"),
                    "an integer or a list of integers expected",
                ))
            }
        };
        values.insert(name.clone(), ids);
    }
    if values.values().flatten().any(|&v| !(0..=255).contains(&v)) {
        return Err(d.err(
            "labels",
            "label values 0..=255 expected (evald's label maps are 8-bit)",
        ));
    }
    if let Some(order) = d.opt("regions_class_order") {
        let order = order
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().and_then(|x| u8::try_from(x).ok()))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| d.err("regions_class_order", "a list of labels 0..=255 expected"))?;
        // One output channel per foreground region (background excluded).
        let regions = values
            .iter()
            .filter(|(n, _)| n.as_str() != "background")
            .count();
        if order.len() != regions {
            return Err(d.err(
                "regions_class_order",
                format!("{} entries for {regions} regions", order.len()),
            ));
        }
        return Ok(Labels::Regions { class_order: order });
    }
    if region {
        return Err(d.err(
            "regions_class_order",
            "region-based labels need regions_class_order",
        ));
    }
    let mut ids: Vec<i64> = values.values().flatten().copied().collect();
    ids.sort_unstable();
    let consecutive = ids.iter().enumerate().all(|(i, &v)| v == i as i64);
    if !consecutive {
        return Err(d.err("labels", format!("labels {ids:?}: consecutive integers from 0 (background) expected, as nnU-Net requires")));
    }
    Ok(Labels::Classes {
        num_classes: ids.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/nnunet/tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres")
    }

    #[test]
    fn the_tiny_ct_folder_reads_as_nnunet_wrote_it() {
        let m = ModelFolder::open(&fixture(), None).unwrap();
        assert_eq!(m.trainer, "nnUNetTrainer");
        assert_eq!(m.plans_name, "nnUNetPlansTiny");
        assert_eq!(m.configuration.name, "3d_fullres");
        assert_eq!(m.configuration.patch_size, [32, 64, 64]);
        assert_eq!(m.configuration.normalization, [Normalization::Ct]);
        assert_eq!(m.configuration.architecture.kind, ArchKind::PlainConvUNet);
        assert_eq!(
            m.configuration.architecture.features_per_stage,
            [8, 16, 32, 64, 80]
        );
        assert_eq!(m.configuration.architecture.dims(), 3);
        assert_eq!(m.labels, Labels::Classes { num_classes: 3 });
        assert_eq!(m.folds.iter().map(|f| f.0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(m.intensity[0].percentile_00_5, 38.0);
        assert_eq!(
            m.configuration.resampling_data,
            Resampling {
                order: 3,
                order_z: 0,
                force_separate_z: None
            }
        );
        let only1 = ModelFolder::open(&fixture(), Some(&[1])).unwrap();
        assert_eq!(only1.folds.len(), 1);
        assert!(looks_like(&fixture()));
    }

    /// Copy the fixture's json files into `<tmp>/<name>/` with `edit` applied to the plans.
    fn variant(name: &str, edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join(name);
        std::fs::create_dir_all(d.join("fold_0")).unwrap();
        std::fs::write(d.join("fold_0").join(CHECKPOINT), b"").unwrap();
        std::fs::copy(fixture().join(DATASET_JSON), d.join(DATASET_JSON)).unwrap();
        let mut p: Value =
            serde_json::from_slice(&std::fs::read(fixture().join(PLANS_JSON)).unwrap()).unwrap();
        edit(&mut p);
        std::fs::write(d.join(PLANS_JSON), serde_json::to_vec(&p).unwrap()).unwrap();
        (t, d)
    }

    #[test]
    fn what_is_not_stock_is_refused_by_name() {
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "MyTrainer__nnUNetPlansTiny__3d_fullres",
                Box::new(|_| {}),
                "trainer \"MyTrainer\"",
            ),
            (
                "nnUNetTrainer__nnUNetPlansTiny__3d_fullres",
                Box::new(|p| {
                    p["configurations"]["3d_fullres"]["architecture"]["network_class_name"] =
                        "my.Net".into();
                }),
                "network \"my.Net\"",
            ),
            (
                "nnUNetTrainer__nnUNetPlansTiny__3d_fullres",
                Box::new(|p| {
                    p["configurations"]["3d_fullres"]["normalization_schemes"] =
                        serde_json::json!(["RescaleTo01Normalization"]);
                }),
                "normalization Some(\"RescaleTo01Normalization\")",
            ),
            (
                "nnUNetTrainer__nnUNetPlansTiny__3d_fullres",
                Box::new(|p| {
                    p["image_reader_writer"] = "NibabelIOWithReorient".into();
                }),
                "image_reader_writer",
            ),
            (
                "nnUNetTrainer__nnUNetPlansTiny__3d_cascade_fullres",
                Box::new(|p| {
                    let c = p["configurations"]["3d_fullres"].clone();
                    p["configurations"]["3d_cascade_fullres"] = c;
                }),
                "cascade",
            ),
            (
                "nnUNetTrainer__nnUNetPlansTiny__3d_lowres",
                Box::new(|_| {}),
                "no such configuration",
            ),
            (
                "notAFolderName",
                Box::new(|_| {}),
                "not an nnU-Net trained-model folder name",
            ),
        ];
        for (name, edit, want) in cases {
            let (_t, d) = variant(name, edit);
            let e = ModelFolder::open(&d, None).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
        // Epoch variants are stock.
        let (_t, d) = variant(
            "nnUNetTrainer_250epochs__nnUNetPlansTiny__3d_fullres",
            |_| {},
        );
        ModelFolder::open(&d, None).unwrap();
    }

    #[test]
    fn inherited_configurations_take_the_parents_keys() {
        let (_t, d) = variant("nnUNetTrainer__nnUNetPlansTiny__3d_big", |p| {
            p["configurations"]["3d_big"] = serde_json::json!({
                "inherits_from": "3d_fullres", "patch_size": [48, 96, 96]
            });
        });
        let m = ModelFolder::open(&d, None).unwrap();
        assert_eq!(m.configuration.patch_size, [48, 96, 96]);
        assert_eq!(m.configuration.spacing.len(), 3);
        let (_t, d) = variant("nnUNetTrainer__nnUNetPlansTiny__3d_loop", |p| {
            p["configurations"]["3d_loop"] = serde_json::json!({"inherits_from": "3d_loop"});
        });
        assert!(ModelFolder::open(&d, None)
            .unwrap_err()
            .to_string()
            .contains("cycle"));
    }
}
