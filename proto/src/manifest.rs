//! The delta manifest: canonical JSON, content-addressed, and the rules that tie a delta's
//! tensors to the base model they belong to.
//!
//! # Native tensor naming
//!
//! A delta's tensors are named after the base tensors they change, with a role suffix:
//!
//! | tensor | shape | meaning |
//! |---|---|---|
//! | `M.lora_A`, `M.lora_B` | `[r, in]`, `[out, r]` | LoRA on `M.weight` (`[out, in]`, or `[in, out]` with `fan_in_fan_out`) |
//! | `M.lora_bias` | `[out]` | LoRA bias, added to `M.bias` |
//! | `M.ia3_l` | `[out]`, or `[in]` for feed-forward modules | IA3 scaling of `M.weight` |
//! | `T.diff` | shape of `T` | dense difference added to `T` (diff pruning) |
//! | `T.diff_indices`, `T.diff_values` | `[k]` (I64), `[k]` | sparse difference: flat indices into `T` |
//! | `T.replace` | shape of `T` | replaces `T` (BitFit, last-layer, selective modules, `modules_to_save`) |
//! | `T.new` | any | a tensor the base lacks (a classification head) |
//! | `adapter.*`, `prefix.*`, `prompt.*` | any | run-time modules, not mergeable into weights |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// The manifest schema this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Methods a manifest may declare.
pub const METHODS: &[&str] = &[
    "lora",
    "ia3",
    "bitfit",
    "diff",
    "replace",
    "last-layer",
    "selective",
    "full",
    "adapter",
    "prefix",
    "prompt",
    "composite",
];

/// A tensor's name, dtype and shape (a row of a base's tensor table or a delta file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Safetensors dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
}

/// One safetensors file of a delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the delta folder (no `/`).
    pub path: String,
    /// blake3 of the whole file.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// The file's tensors, sorted by name.
    pub tensors: Vec<TensorInfo>,
}

/// The base model a delta belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseRef {
    /// Fingerprint of the base weights (see `crate::fingerprint`).
    pub fingerprint: Digest,
    /// Name the base was registered under, for people; the fingerprint is the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A delta this one was trained on top of (sequential lineage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    /// Manifest digest of the parent.
    pub digest: Digest,
    /// Where it was pulled from, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// LoRA settings, with Hugging Face PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Default rank.
    pub r: u64,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Base weights are stored `[in, out]` (GPT-2 `Conv1D`): ΔW is transposed.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Module names or suffixes LoRA was applied to.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// PEFT `bias`: `none`, `all` or `lora_only` (trained biases arrive as `.replace`).
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Modules trained in full and saved whole (arrive as `.replace` or `.new` tensors).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Per-module rank overrides (module-name pattern → rank).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, u64>,
    /// Per-module alpha overrides (module-name pattern → alpha).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Whether LoRA B carries a bias (`M.lora_bias`).
    #[serde(default)]
    pub lora_bias: bool,
}

fn default_bias() -> String {
    "none".to_owned()
}

impl LoraConfig {
    /// The scale `s` in ΔW = s·B·A for `module`, honouring `rank_pattern`/`alpha_pattern`
    /// (the longest matching pattern wins, as a key matches a module equal to it or ending
    /// in `.key`) and rsLoRA.
    pub fn scale_for(&self, module: &str) -> f64 {
        let r = pattern_lookup(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r) as f64;
        let alpha = pattern_lookup(&self.alpha_pattern, module)
            .copied()
            .unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// The rank `module` is declared to have.
    pub fn rank_for(&self, module: &str) -> u64 {
        pattern_lookup(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r)
    }
}

/// Whether a pattern key selects `module`: equal, or a `.`-separated suffix of it.
pub fn module_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

fn pattern_lookup<'a, V>(map: &'a BTreeMap<String, V>, module: &str) -> Option<&'a V> {
    map.iter()
        .filter(|(k, _)| module_matches(k, module))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| v)
}

/// IA3 settings, with PEFT's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    /// Modules with IA3 vectors.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// Of those, the ones whose vector scales the input side (`[in]`).
    #[serde(default)]
    pub feedforward_modules: Vec<String>,
    /// Base weights are stored `[in, out]`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

impl Ia3Config {
    /// Whether `module`'s vector scales its input (`[in]`) rather than its output: PEFT's
    /// rule, a plain suffix test of the module name against each `feedforward_modules`
    /// key (`name.endswith(key)`), so `output.dense` also matches `attention.output.dense`.
    pub fn is_feedforward(&self, module: &str) -> bool {
        self.feedforward_modules
            .iter()
            .any(|k| module.ends_with(k.as_str()))
    }
}

/// Method-specific settings. Only the sections a delta uses are present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodConfig {
    /// LoRA settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// IA3 settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ia3: Option<Ia3Config>,
    /// Settings of other methods (adapters, prefix, prompt, composition), kept verbatim.
    #[serde(default, flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A delta manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The primary method (one of [`METHODS`]).
    pub method: String,
    /// Method settings.
    #[serde(default)]
    pub config: MethodConfig,
    /// The base model.
    pub base: BaseRef,
    /// Tensor files, sorted by path.
    pub files: Vec<FileEntry>,
    /// Deltas this one was trained on top of, in application order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<Parent>,
    /// How it was made: dataset digests, hyper-parameters, seed, tool versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provenance: BTreeMap<String, serde_json::Value>,
    /// Free annotations (task, license, description).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Why a manifest was refused. Messages name the field, tensor or shape at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not the manifest schema.
    #[error("manifest is not valid: {0}")]
    Syntax(String),
    /// A field breaks a rule.
    #[error("manifest field {field}: {reason}")]
    Field {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor does not fit its role or its base.
    #[error("tensor {tensor}: {reason}")]
    Tensor {
        /// The delta tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
}

fn field(field: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn tensor_err(tensor: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Tensor {
        tensor: tensor.to_owned(),
        reason: reason.into(),
    }
}

impl Manifest {
    /// Parses manifest JSON and checks its self-consistency (not its base or blobs).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Self =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        m.check_shape()?;
        Ok(m)
    }

    /// The canonical bytes: JSON with sorted keys and no whitespace. The manifest's digest
    /// is the blake3 of these bytes.
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serialising a derived struct cannot fail: every map key is a string.
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        out
    }

    /// blake3 of [`Manifest::canonical_json`].
    pub fn digest(&self) -> Digest {
        Digest::of(&self.canonical_json())
    }

    /// Every tensor of every file, with the file it is in.
    pub fn tensors(&self) -> impl Iterator<Item = (&FileEntry, &TensorInfo)> {
        self.files
            .iter()
            .flat_map(|f| f.tensors.iter().map(move |t| (f, t)))
    }

    /// Total bytes of the delta's files.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Self-consistency: schema, method, file names, unique tensor names.
    pub fn check_shape(&self) -> Result<(), ManifestError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(field(
                "schema_version",
                format!(
                    "{} is not supported (expected {SCHEMA_VERSION})",
                    self.schema_version
                ),
            ));
        }
        if !METHODS.contains(&self.method.as_str()) {
            return Err(field(
                "method",
                format!("{:?} is not one of {}", self.method, METHODS.join(", ")),
            ));
        }
        if self.method == "lora" && self.config.lora.is_none() {
            return Err(field(
                "config.lora",
                "a lora delta needs its LoRA settings (r, lora_alpha)",
            ));
        }
        if let Some(l) = &self.config.lora
            && (l.r == 0 || !l.lora_alpha.is_finite())
        {
            return Err(field("config.lora", "r must be ≥ 1 and lora_alpha finite"));
        }
        if self.files.is_empty() {
            return Err(field("files", "a delta has at least one tensor file"));
        }
        let mut paths = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for f in &self.files {
            let ok = !f.path.is_empty()
                && f.path.len() <= 128
                && f.path.ends_with(".safetensors")
                && !f.path.starts_with('.')
                && f.path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(field(
                    "files.path",
                    format!("{:?} must be a plain *.safetensors file name", f.path),
                ));
            }
            if !paths.insert(&f.path) {
                return Err(field("files.path", format!("{:?} appears twice", f.path)));
            }
            if f.tensors.is_empty() {
                return Err(field("files.tensors", format!("{} has no tensors", f.path)));
            }
            for t in &f.tensors {
                if !names.insert(&t.name) {
                    return Err(tensor_err(&t.name, "appears in more than one file"));
                }
            }
        }
        Ok(())
    }

    /// Checks every tensor against its role and the base's tensor table: LoRA `A` is
    /// `[r, in]` and `B` is `[out, r]` for a base weight `[out, in]`, replacements and
    /// diffs have the base tensor's shape, and so on (see the module docs).
    pub fn check_against_base(
        &self,
        base: &BTreeMap<String, TensorInfo>,
    ) -> Result<(), ManifestError> {
        let all: BTreeMap<&str, &TensorInfo> =
            self.tensors().map(|(_, t)| (t.name.as_str(), t)).collect();
        let check = BaseCheck {
            base,
            all: &all,
            lora: self.config.lora.as_ref(),
        };
        for (name, t) in &all {
            check.tensor(name, t)?;
        }
        Ok(())
    }
}

/// A delta's tensors (`all`, by name) checked one by one against a base's tensor table.
struct BaseCheck<'a> {
    base: &'a BTreeMap<String, TensorInfo>,
    all: &'a BTreeMap<&'a str, &'a TensorInfo>,
    lora: Option<&'a LoraConfig>,
}

impl BaseCheck<'_> {
    /// Tensor `name` of the delta against its role.
    fn tensor(&self, name: &str, t: &TensorInfo) -> Result<(), ManifestError> {
        if !is_float(&t.dtype) && !name.ends_with(".diff_indices") {
            return Err(tensor_err(
                name,
                format!("dtype {} is not a float type", t.dtype),
            ));
        }
        match classify(name) {
            Role::Runtime => {}
            Role::LoraA(m) => self.lora_a(name, t, m)?,
            Role::LoraB(m) => {
                self.partner(name, &format!("{m}.lora_A"))?;
            }
            Role::LoraBias(m) => {
                let w = self.base_tensor(name, &format!("{m}.weight"))?;
                let out = if self.fan_in_fan_out() {
                    w.shape.get(1)
                } else {
                    w.shape.first()
                };
                if t.shape.as_slice() != [out.copied().unwrap_or(0)] {
                    return Err(tensor_err(
                        name,
                        format!(
                            "shape {:?} does not match the output size of {m}.weight {:?}",
                            t.shape, w.shape
                        ),
                    ));
                }
            }
            Role::Ia3(m) => {
                let w = self.base_tensor(name, &format!("{m}.weight"))?;
                let [out, inp] = two_d(name, &w.shape, "base weight")?;
                if t.shape.as_slice() != [out] && t.shape.as_slice() != [inp] {
                    return Err(tensor_err(
                        name,
                        format!(
                            "IA3 vector {:?} fits neither side of {m}.weight {:?}",
                            t.shape, w.shape
                        ),
                    ));
                }
            }
            Role::Diff(target) | Role::Replace(target) => {
                let b = self.base_tensor(name, target)?;
                if b.shape != t.shape {
                    return Err(tensor_err(
                        name,
                        format!(
                            "shape {:?} differs from base {target} {:?}",
                            t.shape, b.shape
                        ),
                    ));
                }
            }
            Role::DiffIndices(target) => {
                self.base_tensor(name, target)?;
                let v = self.partner(name, &format!("{target}.diff_values"))?;
                if t.dtype != "I64" || t.shape.len() != 1 || v.shape != t.shape {
                    return Err(tensor_err(
                        name,
                        format!(
                            "sparse diff needs I64 indices [k] and values [k], got {} {:?} and {:?}",
                            t.dtype, t.shape, v.shape
                        ),
                    ));
                }
            }
            Role::DiffValues(target) => {
                self.partner(name, &format!("{target}.diff_indices"))?;
            }
            Role::New(target) => {
                if self.base.contains_key(target) {
                    return Err(tensor_err(
                        name,
                        format!("adds {target}, which the base already has: use .replace"),
                    ));
                }
            }
            Role::Unknown => {
                return Err(tensor_err(
                    name,
                    "has no known role: expected a suffix .lora_A, .lora_B, .lora_bias, .ia3_l, .diff, .diff_indices, .diff_values, .replace or .new, or a prefix adapter., prefix. or prompt.",
                ));
            }
        }
        Ok(())
    }

    /// LoRA `A` of module `m`: `[r, in]`, with a `B` of `[out, r]` for the base weight
    /// `[out, in]` (`[in, out]` with `fan_in_fan_out`), and the rank the config declares.
    fn lora_a(&self, name: &str, t: &TensorInfo, m: &str) -> Result<(), ManifestError> {
        let b_name = format!("{m}.lora_B");
        let b = self.partner(name, &b_name)?;
        let w = self.base_tensor(name, &format!("{m}.weight"))?;
        let [out, inp] = two_d(name, &w.shape, "base weight")?;
        let (out, inp) = if self.fan_in_fan_out() {
            (inp, out)
        } else {
            (out, inp)
        };
        let [r, a_in] = two_d(name, &t.shape, "lora_A")?;
        if let Some(cfg) = self.lora {
            let declared = cfg.rank_for(m);
            if declared != r {
                return Err(tensor_err(
                    name,
                    format!(
                        "has rank {r} but the LoRA config declares {declared} for {m} (r / rank_pattern)"
                    ),
                ));
            }
        }
        let [b_out, b_r] = two_d(&b_name, &b.shape, "lora_B")?;
        if a_in != inp || b_out != out || b_r != r || r == 0 {
            return Err(tensor_err(
                name,
                format!(
                    "LoRA shapes A {:?} and B {:?} do not fit base weight {m}.weight {:?}: expected A [r, {inp}] and B [{out}, r]",
                    t.shape, b.shape, w.shape
                ),
            ));
        }
        Ok(())
    }

    fn fan_in_fan_out(&self) -> bool {
        self.lora.is_some_and(|l| l.fan_in_fan_out)
    }

    /// The base tensor `target` that delta tensor `delta` acts on.
    fn base_tensor(&self, delta: &str, target: &str) -> Result<&TensorInfo, ManifestError> {
        self.base.get(target).ok_or_else(|| {
            tensor_err(
                delta,
                format!("targets {target}, which the base does not have"),
            )
        })
    }

    /// The other half of a pair (`lora_A`/`lora_B`, `diff_indices`/`diff_values`).
    fn partner(&self, name: &str, partner: &str) -> Result<&TensorInfo, ManifestError> {
        self.all
            .get(partner)
            .copied()
            .ok_or_else(|| tensor_err(name, format!("has no matching {partner}")))
    }
}

fn two_d(name: &str, shape: &[u64], what: &str) -> Result<[u64; 2], ManifestError> {
    match shape {
        [a, b] => Ok([*a, *b]),
        _ => Err(tensor_err(
            name,
            format!("{what} must be 2-D, got {shape:?}"),
        )),
    }
}

fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32" | "F64")
}

/// What a delta tensor does, from its name (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    /// LoRA A of module `M`.
    LoraA(&'a str),
    /// LoRA B of module `M`.
    LoraB(&'a str),
    /// LoRA bias of module `M`.
    LoraBias(&'a str),
    /// IA3 vector of module `M`.
    Ia3(&'a str),
    /// Dense diff of tensor `T`.
    Diff(&'a str),
    /// Sparse diff indices of tensor `T`.
    DiffIndices(&'a str),
    /// Sparse diff values of tensor `T`.
    DiffValues(&'a str),
    /// Replacement of tensor `T`.
    Replace(&'a str),
    /// A new tensor `T`.
    New(&'a str),
    /// An adapter, prefix or prompt parameter (run time only).
    Runtime,
    /// None of the above.
    Unknown,
}

/// Classifies a delta tensor name.
pub fn classify(name: &str) -> Role<'_> {
    if ["adapter.", "prefix.", "prompt."]
        .iter()
        .any(|p| name.starts_with(p))
    {
        return Role::Runtime;
    }
    let Some((target, suffix)) = name.rsplit_once('.') else {
        return Role::Unknown;
    };
    match suffix {
        "lora_A" => Role::LoraA(target),
        "lora_B" => Role::LoraB(target),
        "lora_bias" => Role::LoraBias(target),
        "ia3_l" => Role::Ia3(target),
        "diff" => Role::Diff(target),
        "diff_indices" => Role::DiffIndices(target),
        "diff_values" => Role::DiffValues(target),
        "replace" => Role::Replace(target),
        "new" => Role::New(target),
        _ => Role::Unknown,
    }
}

fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        // Scalars have a single compact serialisation.
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests;
