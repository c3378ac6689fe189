//! nnU-Net's networks in libtorch: `PlainConvUNet` and `ResidualEncoderUNet` (2D or 3D) of
//! dynamic_network_architectures 0.4.4, built from the plans' [`Architecture`] and a
//! checkpoint's weights exactly as nnU-Net builds them for inference (deep supervision
//! off: only the last segmentation layer runs), and run with the same libtorch operators
//! PyTorch's modules call (`conv3d`, `instance_norm`, `leaky_relu`, `conv_transpose3d`,
//! `avg_pool3d`, `cat`), so that on the CPU the outputs are PyTorch's, bit for bit.
//!
//! Every weight name is checked the way `load_state_dict(strict=True)` would: a missing,
//! unexpected or misshaped tensor is an error naming it. The state dict also holds alias
//! names of the same tensors (`...all_modules.N.*` for a block's conv and norm,
//! `decoder.encoder.*` for the whole encoder); PyTorch loads every alias and the last
//! one wins, so here each alias must be present and equal to its canonical tensor (a
//! genuine checkpoint shares one storage between them).
//!
//! References (dynamic_network_architectures 0.4.4): `architectures/unet.py`,
//! `building_blocks/plain_conv_encoder.py`, `residual_encoders.py`, `residual.py`
//! (BasicBlockD), `unet_decoder.py`, `simple_conv_blocks.py` (ConvDropoutNormReLU).

use std::collections::{BTreeMap, BTreeSet};

use tch::{Device, Kind, Tensor};

use super::checkpoint::Weight;
use super::plans::{ArchKind, Architecture};

/// Why a network cannot be built or run.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The architecture is not one this module builds.
    #[error("network architecture: {0}")]
    Architecture(String),
    /// A weight the architecture needs is not in the checkpoint.
    #[error("network weights: {name} is missing (the checkpoint does not match plans.json's architecture)")]
    Missing {
        /// State-dict name.
        name: String,
    },
    /// Weights the architecture does not have.
    #[error("network weights: {count} unexpected tensor(s), e.g. {names:?} (the checkpoint does not match plans.json's architecture)")]
    Unexpected {
        /// How many.
        count: usize,
        /// The first few names.
        names: Vec<String>,
    },
    /// A weight has another shape than the architecture's.
    #[error("network weights: {name} has shape {found:?}, the architecture needs {expected:?}")]
    Shape {
        /// State-dict name.
        name: String,
        /// Its shape.
        found: Vec<usize>,
        /// The shape needed.
        expected: Vec<usize>,
    },
    /// An alias name holds other values than the tensor it names.
    #[error("network weights: {alias} differs from {name}, which it should alias")]
    Alias {
        /// The alias.
        alias: String,
        /// The canonical name.
        name: String,
    },
    /// The input does not fit the network.
    #[error("network input: {0}")]
    Input(String),
    /// libtorch failed.
    #[error("libtorch, {during}: {message}")]
    Torch {
        /// What was being done.
        during: &'static str,
        /// libtorch's message, first line.
        message: String,
    },
}

impl NetworkError {
    fn torch(during: &'static str) -> impl Fn(tch::TchError) -> NetworkError {
        move |e| NetworkError::Torch {
            during,
            message: crate::infer::first_line(&e),
        }
    }
}

impl From<NetworkError> for crate::infer::InferError {
    fn from(e: NetworkError) -> Self {
        match e {
            NetworkError::Torch { message, .. } if message.contains("out of memory") => {
                crate::infer::InferError::OutOfMemory { batch: 1, message }
            }
            NetworkError::Torch { during, message } => {
                crate::infer::InferError::Torch(format!("{during}: {message}"))
            }
            NetworkError::Input(message) => crate::infer::InferError::Forward {
                input_shape: Vec::new(),
                message,
            },
            other => super::checkpoint::load_error(std::path::PathBuf::new(), other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, NetworkError>;

/// A convolution (or transposed convolution) and its settings.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: Vec<i64>,
    padding: Vec<i64>,
}

/// `ConvDropoutNormReLU`: conv -> instance norm -> leaky ReLU (the last optional).
#[derive(Debug)]
struct Block {
    conv: Conv,
    norm_weight: Option<Tensor>,
    norm_bias: Option<Tensor>,
    nonlin: bool,
}

/// `BasicBlockD`: two blocks (the second without nonlinearity) plus a skip (average pool
/// over the stride, then a 1x1 conv + norm when the channels change), then the
/// nonlinearity.
#[derive(Debug)]
struct Residual {
    conv1: Block,
    conv2: Block,
    pool: Option<Vec<i64>>,
    projection: Option<Block>,
}

#[derive(Debug)]
enum Encoder {
    Plain(Vec<Vec<Block>>),
    Residual {
        stem: Block,
        stages: Vec<Vec<Residual>>,
    },
}

#[derive(Debug)]
struct DecoderStage {
    transpconv: Conv,
    blocks: Vec<Block>,
}

/// A built network, its weights on one device.
#[derive(Debug)]
pub struct Network {
    dims: usize,
    in_channels: usize,
    out_channels: usize,
    eps: f64,
    negative_slope: f64,
    encoder: Encoder,
    decoder: Vec<DecoderStage>,
    seg: Conv,
}

/// Takes weights by name, checks shapes and aliases, and remembers what was used.
struct Loader<'a> {
    weights: &'a BTreeMap<String, Weight>,
    used: BTreeSet<&'a str>,
    device: Device,
}

impl<'a> Loader<'a> {
    /// The tensor `names[0]` with `shape`; every further name is an alias that must hold
    /// the same values.
    fn take(&mut self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        let Some(first) = names.first() else {
            return Err(NetworkError::Architecture("a tensor without a name".into()));
        };
        let mut canonical: Option<&'a Weight> = None;
        for name in names {
            let (key, w) = self
                .weights
                .get_key_value(name)
                .ok_or_else(|| NetworkError::Missing { name: name.clone() })?;
            if w.shape != shape {
                return Err(NetworkError::Shape {
                    name: name.clone(),
                    found: w.shape.clone(),
                    expected: shape.to_vec(),
                });
            }
            match canonical {
                None => canonical = Some(w),
                Some(c) => {
                    let same = c.data.len() == w.data.len()
                        && c.data
                            .iter()
                            .zip(&w.data)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                    if !same {
                        return Err(NetworkError::Alias {
                            alias: name.clone(),
                            name: first.clone(),
                        });
                    }
                }
            }
            self.used.insert(key.as_str());
        }
        let w = canonical.ok_or_else(|| NetworkError::Missing {
            name: first.clone(),
        })?;
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::f_from_slice(&w.data)
            .and_then(|t| t.f_reshape(dims.as_slice()))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(NetworkError::torch("copying weights to the device"))
    }

    /// Names of `suffix` under each prefix (the first is canonical).
    fn names(prefixes: &[String], suffix: &str) -> Vec<String> {
        prefixes.iter().map(|p| format!("{p}.{suffix}")).collect()
    }

    /// A `ConvDropoutNormReLU` at `prefixes` (its own name first, then the same module
    /// reached through `decoder.encoder`): its conv is also `all_modules.0`, its norm
    /// `all_modules.1` (nnU-Net never sets a dropout, which would shift the indices).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        prefixes: &[String],
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
        bias: bool,
        affine: bool,
        nonlin: bool,
    ) -> Result<Block> {
        let both = |m: &str, alias: &str, p: &str| {
            let mut n = Self::names(prefixes, &format!("{m}.{p}"));
            n.extend(Self::names(prefixes, &format!("all_modules.{alias}.{p}")));
            n
        };
        let mut wshape = vec![cout, cin];
        wshape.extend_from_slice(kernel);
        let weight = self.take(&both("conv", "0", "weight"), &wshape)?;
        let bias = if bias {
            Some(self.take(&both("conv", "0", "bias"), &[cout])?)
        } else {
            None
        };
        let (norm_weight, norm_bias) = if affine {
            (
                Some(self.take(&both("norm", "1", "weight"), &[cout])?),
                Some(self.take(&both("norm", "1", "bias"), &[cout])?),
            )
        } else {
            (None, None)
        };
        Ok(Block {
            conv: Conv {
                weight,
                bias,
                stride: stride.iter().map(|&s| s as i64).collect(),
                padding: kernel.iter().map(|&k| ((k as i64) - 1) / 2).collect(),
            },
            norm_weight,
            norm_bias,
            nonlin,
        })
    }

    fn unexpected(&self) -> Result<()> {
        let extra: Vec<&String> = self
            .weights
            .keys()
            .filter(|k| !self.used.contains(k.as_str()))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        Err(NetworkError::Unexpected {
            count: extra.len(),
            names: extra.into_iter().take(5).cloned().collect(),
        })
    }
}

/// The encoder's prefixes for a module path below it: `encoder.<p>` and its alias
/// `decoder.encoder.<p>` (UNetDecoder keeps a reference to the encoder).
fn enc(p: &str) -> Vec<String> {
    vec![format!("encoder.{p}"), format!("decoder.encoder.{p}")]
}

impl Network {
    /// Build the network of `arch` with `in_channels` inputs and `out_channels` outputs
    /// (`LabelManager.num_segmentation_heads`) from a checkpoint's `network_weights`, on
    /// `device`.
    ///
    /// # Errors
    /// [`NetworkError`] naming the tensor for a missing, unexpected, misshaped or
    /// inconsistent alias weight; [`NetworkError::Architecture`] for an architecture that
    /// is not 2D/3D or whose lists do not have a length per stage.
    pub fn new(
        arch: &Architecture,
        in_channels: usize,
        out_channels: usize,
        weights: &BTreeMap<String, Weight>,
        device: Device,
    ) -> Result<Self> {
        let dims = arch.dims();
        let n = arch.n_stages;
        let f = &arch.features_per_stage;
        let ok = (2..=3).contains(&dims)
            && n >= 1
            && f.len() == n
            && arch.kernel_sizes.len() == n
            && arch.strides.len() == n
            && arch.n_per_stage.len() == n
            && arch.n_conv_per_stage_decoder.len() + 1 == n
            && arch
                .kernel_sizes
                .iter()
                .chain(&arch.strides)
                .all(|v| v.len() == dims && v.iter().all(|&x| x >= 1))
            && f.iter().all(|&c| c >= 1)
            && arch.n_per_stage.iter().all(|&c| c >= 1)
            && arch.n_conv_per_stage_decoder.iter().all(|&c| c >= 1)
            && in_channels >= 1
            && out_channels >= 1;
        if !ok {
            return Err(NetworkError::Architecture(format!(
                "{n} stages with features {f:?}, kernels {:?}, strides {:?}, per stage {:?}, \
                 decoder {:?}, {in_channels} -> {out_channels} channels: inconsistent",
                arch.kernel_sizes, arch.strides, arch.n_per_stage, arch.n_conv_per_stage_decoder
            )));
        }
        let mut l = Loader {
            weights,
            used: BTreeSet::new(),
            device,
        };
        let (bias, affine) = (arch.conv_bias, arch.norm_affine);
        let ones = vec![1usize; dims];

        let encoder = match arch.kind {
            ArchKind::PlainConvUNet => {
                // PlainConvEncoder: stage s = Sequential(StackedConvBlocks), so its convs
                // are `stages.<s>.0.convs.<c>`; the first carries the stage's stride.
                let mut stages = Vec::with_capacity(n);
                let mut cin = in_channels;
                for (s, &fs) in f.iter().enumerate() {
                    let mut blocks = Vec::new();
                    for c in 0..arch.n_per_stage[s] {
                        let stride = if c == 0 { &arch.strides[s] } else { &ones };
                        blocks.push(l.block(
                            &enc(&format!("stages.{s}.0.convs.{c}")),
                            if c == 0 { cin } else { fs },
                            fs,
                            &arch.kernel_sizes[s],
                            stride,
                            bias,
                            affine,
                            true,
                        )?);
                    }
                    stages.push(blocks);
                    cin = fs;
                }
                Encoder::Plain(stages)
            }
            ArchKind::ResidualEncoderUNet => {
                // ResidualEncoder: a stem (one conv block, kernel of stage 0, stride 1),
                // then stage s = StackedResidualBlocks `stages.<s>.blocks.<b>`.
                let stem = l.block(
                    &enc("stem.convs.0"),
                    in_channels,
                    f[0],
                    &arch.kernel_sizes[0],
                    &ones,
                    bias,
                    affine,
                    true,
                )?;
                let mut stages = Vec::with_capacity(n);
                let mut cin = f[0];
                for (s, &fs) in f.iter().enumerate() {
                    let mut blocks = Vec::new();
                    for b in 0..arch.n_per_stage[s] {
                        let p = format!("stages.{s}.blocks.{b}");
                        let stride = if b == 0 { &arch.strides[s] } else { &ones };
                        let bin = if b == 0 { cin } else { fs };
                        let k = &arch.kernel_sizes[s];
                        let conv1 = l.block(
                            &enc(&format!("{p}.conv1")),
                            bin,
                            fs,
                            k,
                            stride,
                            bias,
                            affine,
                            true,
                        )?;
                        let conv2 = l.block(
                            &enc(&format!("{p}.conv2")),
                            fs,
                            fs,
                            k,
                            &ones,
                            bias,
                            affine,
                            false,
                        )?;
                        let has_stride = stride.iter().any(|&x| x != 1);
                        let pool = has_stride.then(|| stride.iter().map(|&x| x as i64).collect());
                        // The projection is skip.1 after a pool, else skip.0; its conv has
                        // no bias whatever conv_bias says (residual.py).
                        let projection = if bin != fs {
                            let i = usize::from(has_stride);
                            Some(l.block(
                                &enc(&format!("{p}.skip.{i}")),
                                bin,
                                fs,
                                &ones,
                                &ones,
                                false,
                                affine,
                                false,
                            )?)
                        } else {
                            None
                        };
                        blocks.push(Residual {
                            conv1,
                            conv2,
                            pool,
                            projection,
                        });
                    }
                    stages.push(blocks);
                    cin = fs;
                }
                Encoder::Residual { stem, stages }
            }
        };

        // UNetDecoder: stage s upsamples stage n-1-s by its stride, concatenates the skip
        // of stage n-2-s and runs its conv blocks with that stage's kernel.
        let mut decoder = Vec::with_capacity(n - 1);
        let mut seg = None;
        for s in 0..n - 1 {
            let below = f[n - 1 - s];
            let skip = f[n - 2 - s];
            let st = &arch.strides[n - 1 - s];
            let mut tshape = vec![below, skip];
            tshape.extend_from_slice(st);
            let tw = l.take(&[format!("decoder.transpconvs.{s}.weight")], &tshape)?;
            let tb = if bias {
                Some(l.take(&[format!("decoder.transpconvs.{s}.bias")], &[skip])?)
            } else {
                None
            };
            let mut blocks = Vec::new();
            for c in 0..arch.n_conv_per_stage_decoder[s] {
                blocks.push(l.block(
                    &[format!("decoder.stages.{s}.convs.{c}")],
                    if c == 0 { 2 * skip } else { skip },
                    skip,
                    &arch.kernel_sizes[n - 2 - s],
                    &ones,
                    bias,
                    affine,
                    true,
                )?);
            }
            decoder.push(DecoderStage {
                transpconv: Conv {
                    weight: tw,
                    bias: tb,
                    stride: st.iter().map(|&x| x as i64).collect(),
                    padding: vec![0; dims],
                },
                blocks,
            });
            // Every stage has a 1x1 segmentation layer (with bias) for deep supervision;
            // all are in the state dict, only the last runs at inference.
            let mut sshape = vec![out_channels, skip];
            sshape.extend_from_slice(&ones);
            let sw = l.take(&[format!("decoder.seg_layers.{s}.weight")], &sshape)?;
            let sb = l.take(&[format!("decoder.seg_layers.{s}.bias")], &[out_channels])?;
            seg = Some(Conv {
                weight: sw,
                bias: Some(sb),
                stride: vec![1; dims],
                padding: vec![0; dims],
            });
        }
        l.unexpected()?;
        let seg = seg
            .ok_or_else(|| NetworkError::Architecture("a U-Net needs at least 2 stages".into()))?;
        Ok(Network {
            dims,
            in_channels,
            out_channels,
            eps: arch.norm_eps,
            negative_slope: arch.negative_slope,
            encoder,
            decoder,
            seg,
        })
    }

    /// 2 or 3.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The logits of `x` (`[N, C, (z,) y, x]` float32 on the network's device), as the
    /// PyTorch module's forward computes them.
    ///
    /// # Errors
    /// [`NetworkError::Input`] for the wrong rank or channels, [`NetworkError::Torch`]
    /// for a libtorch failure (sizes that do not survive the strides, out of memory).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        if size.len() != self.dims + 2 || size[1] != self.in_channels as i64 {
            return Err(NetworkError::Input(format!(
                "shape {size:?}, expected [N, {}, {}]",
                self.in_channels,
                if self.dims == 3 { "z, y, x" } else { "y, x" }
            )));
        }
        if x.kind() != Kind::Float {
            return Err(NetworkError::Input(format!(
                "{:?}, expected float32",
                x.kind()
            )));
        }
        let _guard = tch::no_grad_guard();
        let mut skips: Vec<Tensor> = Vec::new();
        match &self.encoder {
            Encoder::Plain(stages) => {
                let mut h = x.shallow_clone();
                for blocks in stages {
                    for b in blocks {
                        h = self.block(b, &h)?;
                    }
                    skips.push(h.shallow_clone());
                }
            }
            Encoder::Residual { stem, stages } => {
                let mut h = self.block(stem, x)?;
                for blocks in stages {
                    for r in blocks {
                        h = self.residual(r, &h)?;
                    }
                    skips.push(h.shallow_clone());
                }
            }
        }
        let torch = NetworkError::torch("decoder");
        let mut lres = skips
            .last()
            .ok_or_else(|| NetworkError::Architecture("no encoder stage".into()))?
            .shallow_clone();
        let n = skips.len();
        for (s, stage) in self.decoder.iter().enumerate() {
            let up = self.transpose(&stage.transpconv, &lres)?;
            let skip = (n - 1)
                .checked_sub(s + 1)
                .and_then(|i| skips.get(i))
                .ok_or_else(|| NetworkError::Architecture("decoder deeper than encoder".into()))?;
            let mut h = Tensor::f_cat(&[&up, skip], 1).map_err(&torch)?;
            for b in &stage.blocks {
                h = self.block(b, &h)?;
            }
            lres = h;
        }
        self.conv(&self.seg, &lres)
    }

    fn conv(&self, c: &Conv, x: &Tensor) -> Result<Tensor> {
        let r = if self.dims == 3 {
            x.f_conv3d(
                &c.weight,
                c.bias.as_ref(),
                c.stride.as_slice(),
                c.padding.as_slice(),
                [1i64; 3],
                1,
            )
        } else {
            x.f_conv2d(
                &c.weight,
                c.bias.as_ref(),
                c.stride.as_slice(),
                c.padding.as_slice(),
                [1i64; 2],
                1,
            )
        };
        r.map_err(NetworkError::torch("convolution"))
    }

    fn transpose(&self, c: &Conv, x: &Tensor) -> Result<Tensor> {
        let zeros = vec![0i64; self.dims];
        let ones = vec![1i64; self.dims];
        let r = if self.dims == 3 {
            x.f_conv_transpose3d(
                &c.weight,
                c.bias.as_ref(),
                c.stride.as_slice(),
                zeros.as_slice(),
                zeros.as_slice(),
                1,
                ones.as_slice(),
            )
        } else {
            x.f_conv_transpose2d(
                &c.weight,
                c.bias.as_ref(),
                c.stride.as_slice(),
                zeros.as_slice(),
                zeros.as_slice(),
                1,
                ones.as_slice(),
            )
        };
        r.map_err(NetworkError::torch("transposed convolution"))
    }

    /// LeakyReLU as `nn.LeakyReLU(negative_slope, inplace=True)`: libtorch's own kernel for
    /// the default slope (the only one tch exposes), `x > 0 ? x : x * slope` otherwise, which
    /// is that kernel's formula in float32; ReLU for slope 0. In place, as nnU-Net's modules
    /// do: `x` is always a tensor the caller has just made (a norm's or a sum's output), and
    /// writing over it saves one allocation and one pass over memory per block.
    fn nonlin(&self, mut x: Tensor) -> Result<Tensor> {
        let torch = NetworkError::torch("leaky ReLU");
        if self.negative_slope == 0.0 {
            x.f_relu_().map_err(torch)
        } else if self.negative_slope == 0.01 {
            x.f_leaky_relu_().map_err(torch)
        } else {
            let neg = x.f_mul_scalar(self.negative_slope).map_err(&torch)?;
            let pos = x.f_gt(0.0).map_err(&torch)?;
            x.f_where_self(&pos, &neg).map_err(torch)
        }
    }

    fn block(&self, b: &Block, x: &Tensor) -> Result<Tensor> {
        let h = self.conv(&b.conv, x)?;
        // F.instance_norm: no running statistics, input statistics, momentum 0.1 unused,
        // cudnn_enabled as torch.backends.cudnn.enabled (true).
        let h = h
            .f_instance_norm(
                b.norm_weight.as_ref(),
                b.norm_bias.as_ref(),
                None::<&Tensor>,
                None::<&Tensor>,
                true,
                0.1,
                self.eps,
                true,
            )
            .map_err(NetworkError::torch("instance norm"))?;
        if b.nonlin {
            self.nonlin(h)
        } else {
            Ok(h)
        }
    }

    fn residual(&self, r: &Residual, x: &Tensor) -> Result<Tensor> {
        let torch = NetworkError::torch("residual block");
        let mut skip = x.shallow_clone();
        if let Some(k) = &r.pool {
            // nn.AvgPool{2,3}d(stride, stride): no padding, floor, count_include_pad.
            skip = if self.dims == 3 {
                skip.f_avg_pool3d(k.as_slice(), k.as_slice(), [0i64; 3], false, true, None)
            } else {
                skip.f_avg_pool2d(k.as_slice(), k.as_slice(), [0i64; 2], false, true, None)
            }
            .map_err(&torch)?;
        }
        if let Some(p) = &r.projection {
            skip = self.block(p, &skip)?;
        }
        let h = self.block(&r.conv1, x)?;
        let h = self.block(&r.conv2, &h)?;
        let h = h.f_add(&skip).map_err(torch)?;
        self.nonlin(h)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::infer::nnunet::{checkpoint, npy};
    use std::path::{Path, PathBuf};

    /// `tests/data/nnunet/networks/<name>`.
    pub(crate) fn dir(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/nnunet/networks")
            .join(name)
    }

    fn usizes(v: &serde_json::Value) -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    }

    /// The architecture make_network_reference.py built, as plans.json would give it, with
    /// its input and output channels.
    pub(crate) fn arch(name: &str) -> (Architecture, usize, usize) {
        let a: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir(name).join("arch.json")).unwrap()).unwrap();
        let nested =
            |k: &str| -> Vec<Vec<usize>> { a[k].as_array().unwrap().iter().map(usizes).collect() };
        let features = usizes(&a["features_per_stage"]);
        (
            Architecture {
                kind: match a["kind"].as_str().unwrap() {
                    "PlainConvUNet" => ArchKind::PlainConvUNet,
                    _ => ArchKind::ResidualEncoderUNet,
                },
                n_stages: features.len(),
                features_per_stage: features,
                kernel_sizes: nested("kernel_sizes"),
                strides: nested("strides"),
                n_per_stage: usizes(&a["n_per_stage"]),
                n_conv_per_stage_decoder: usizes(&a["n_conv_per_stage_decoder"]),
                conv_bias: a["conv_bias"].as_bool().unwrap(),
                norm_eps: 1e-5,
                norm_affine: true,
                negative_slope: 0.01,
            },
            a["input_channels"].as_u64().unwrap() as usize,
            a["num_classes"].as_u64().unwrap() as usize,
        )
    }

    fn tensor(a: &npy::Npy) -> Tensor {
        let shape: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
        Tensor::from_slice(&a.to_f32()).reshape(shape.as_slice())
    }

    #[test]
    fn equals_dynamic_network_architectures_bit_for_bit() {
        // networks/<name>/output_f32.npy: the PyTorch module's own output on the same
        // input and weights (tests/data/nnunet/make_network_reference.py).
        for name in ["plain3d", "resenc3d", "plain2d", "resenc2d"] {
            let (a, cin, cout) = arch(name);
            let ck = checkpoint::read(&dir(name).join("checkpoint.pth")).unwrap();
            let net = Network::new(&a, cin, cout, &ck.weights, Device::Cpu).unwrap();
            let x = tensor(&npy::read(&dir(name).join("input_f32.npy")).unwrap()).unsqueeze(0);
            let want = npy::read(&dir(name).join("output_f32.npy")).unwrap();
            let y = net.forward(&x).unwrap().squeeze_dim(0);
            let got: Vec<f32> = Vec::<f32>::try_from(y.flatten(0, -1)).unwrap();
            let want_v = want.to_f32();
            assert_eq!(
                y.size(),
                want.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()
            );
            let diff = got
                .iter()
                .zip(&want_v)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(diff, 0, "{name}: {diff} of {} values differ", got.len());
        }
    }

    #[test]
    fn every_weight_name_is_checked() {
        let (a, cin, cout) = arch("resenc3d");
        let ck = checkpoint::read(&dir("resenc3d").join("checkpoint.pth")).unwrap();
        let build = |w: &BTreeMap<String, Weight>| Network::new(&a, cin, cout, w, Device::Cpu);
        assert!(build(&ck.weights).is_ok());

        // A canonical name, an all_modules alias and a decoder.encoder alias missing.
        for name in [
            "encoder.stages.1.blocks.0.skip.1.conv.weight",
            "encoder.stem.convs.0.all_modules.1.bias",
            "decoder.encoder.stages.2.blocks.1.conv2.norm.weight",
            "decoder.seg_layers.0.bias",
        ] {
            let mut w = ck.weights.clone();
            assert!(w.remove(name).is_some(), "{name} not in the fixture");
            let e = build(&w).unwrap_err();
            assert!(
                matches!(&e, NetworkError::Missing { name: n } if n == name),
                "{e}"
            );
        }
        // An unexpected one (a running statistic an InstanceNorm does not have).
        let mut w = ck.weights.clone();
        w.insert(
            "encoder.stem.convs.0.norm.running_mean".into(),
            Weight {
                shape: vec![4],
                data: vec![0.0; 4],
            },
        );
        let e = build(&w).unwrap_err();
        assert!(
            matches!(&e, NetworkError::Unexpected { count: 1, names } if names[0].ends_with("running_mean")),
            "{e}"
        );
        // A wrong shape.
        let mut w = ck.weights.clone();
        w.insert(
            "decoder.transpconvs.0.weight".into(),
            Weight {
                shape: vec![12, 8, 2, 2, 2],
                data: vec![0.0; 12 * 8 * 8],
            },
        );
        let e = build(&w).unwrap_err();
        assert!(
            matches!(&e, NetworkError::Shape { name, expected, .. } if name == "decoder.transpconvs.0.weight" && expected == &vec![12, 8, 1, 2, 2]),
            "{e}"
        );
        // An alias with other values.
        let mut w = ck.weights.clone();
        let k = "decoder.encoder.stages.0.blocks.0.conv1.all_modules.0.weight";
        if let Some(x) = w.get_mut(k) {
            x.data[0] += 1.0;
        }
        let e = build(&w).unwrap_err();
        assert!(
            matches!(&e, NetworkError::Alias { alias, .. } if alias == k),
            "{e}"
        );
        // Another architecture (the plain one) over these weights.
        let (plain, _, _) = arch("plain3d");
        assert!(Network::new(&plain, cin, cout, &ck.weights, Device::Cpu).is_err());
    }

    #[test]
    fn refuses_inputs_that_do_not_fit() {
        let (a, cin, cout) = arch("plain2d");
        let ck = checkpoint::read(&dir("plain2d").join("checkpoint.pth")).unwrap();
        let net = Network::new(&a, cin, cout, &ck.weights, Device::Cpu).unwrap();
        assert!(matches!(
            net.forward(&Tensor::zeros([1, 2, 20, 12], (Kind::Float, Device::Cpu))),
            Err(NetworkError::Input(_))
        ));
        assert!(matches!(
            net.forward(&Tensor::zeros(
                [1, 1, 20, 12, 3],
                (Kind::Float, Device::Cpu)
            )),
            Err(NetworkError::Input(_))
        ));
        // Sizes the strides cannot undo: libtorch's error, not a panic.
        assert!(matches!(
            net.forward(&Tensor::zeros([1, 1, 7, 5], (Kind::Float, Device::Cpu))),
            Err(NetworkError::Torch { .. })
        ));
    }
}
