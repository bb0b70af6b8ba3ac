//! The model and admin flags every part takes, flattened into each part's `Config`.
//!
//! The flags are the same everywhere (`--model-dir`, `--model-name`, `--admin-addr`); what
//! differs is each part's environment variables (`EMBER_<PART>_…`), its admin port, and whether
//! it serves one model or several. A part says so by a [`Part`] marker type:
//!
//! ```
//! use ember_core::args::{ModelArgs, Part};
//!
//! #[derive(Debug, Clone)]
//! struct Dispatcher;
//! impl Part for Dispatcher {
//!     const MODEL_DIR_ENV: &'static str = "EMBER_DISPATCHER_MODEL_DIRS";
//!     const MODEL_DIR_HELP: &'static str = "Model directories served; repeat or comma-separate";
//!     const MODEL_NAME_ENV: &'static str = "EMBER_DISPATCHER_MODEL_NAME";
//!     const ADMIN_ADDR_ENV: &'static str = "EMBER_DISPATCHER_ADMIN_ADDR";
//!     const ADMIN_ADDR_DEFAULT: &'static str = "127.0.0.1:9200";
//!     const MANY_MODELS: bool = true;
//! }
//!
//! #[derive(Debug, clap::Parser)]
//! struct Config {
//!     #[command(flatten)]
//!     model: ModelArgs<Dispatcher>,
//! }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::ArgAction;

/// The model directory every part defaults to (the bundled demo model).
pub const DEFAULT_MODEL_DIR: &str = "models/ssdlite-person";

/// What one part's [`ModelArgs`] differ in: environment variable names, `--model-dir`'s help,
/// the admin address, and whether `--model-dir` takes several directories.
pub trait Part: fmt::Debug + Clone + Send + Sync + 'static {
    /// Environment variable of `--model-dir`.
    const MODEL_DIR_ENV: &'static str;
    /// `--help` of `--model-dir` (what the part does with the directories).
    const MODEL_DIR_HELP: &'static str;
    /// Environment variable of `--model-name`.
    const MODEL_NAME_ENV: &'static str;
    /// Environment variable of `--admin-addr`.
    const ADMIN_ADDR_ENV: &'static str;
    /// The part's default admin address (each part its own port, so that they share a host).
    const ADMIN_ADDR_DEFAULT: &'static str;
    /// Several models (`--model-dir` repeated, or comma-separated in the variable), or exactly one.
    const MANY_MODELS: bool;
}

/// `--model-dir`, `--model-name` and `--admin-addr`, for `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs<P: Part> {
    /// The model directories (model.onnx, + model.toml when the model needs processing); exactly
    /// one unless the part serves several models.
    #[arg(
        long = "model-dir",
        env = P::MODEL_DIR_ENV,
        help = P::MODEL_DIR_HELP,
        default_value = DEFAULT_MODEL_DIR,
        value_name = if P::MANY_MODELS { "MODEL_DIRS" } else { "MODEL_DIR" },
        action = if P::MANY_MODELS { ArgAction::Append } else { ArgAction::Set },
        value_delimiter = if P::MANY_MODELS { Some(',') } else { None }
    )]
    pub model_dirs: Vec<PathBuf>,

    /// Serve the (single) model directory under this name (queue `ember.jobs.<name>`) instead of
    /// model.toml's.
    #[arg(long = "model-name", env = P::MODEL_NAME_ENV)]
    pub model_name: Option<String>,

    /// Admin server address (/metrics, /livez, /readyz), separate from any API.
    #[arg(long = "admin-addr", env = P::ADMIN_ADDR_ENV, default_value = P::ADMIN_ADDR_DEFAULT)]
    pub admin_addr: SocketAddr,

    #[arg(skip)]
    part: PhantomData<P>,
}

impl<P: Part> ModelArgs<P> {
    /// The model directory of a part that serves one model: `--model-dir` parses to exactly one
    /// there (an empty path only for arguments built by hand without one, which then fails to
    /// load like any missing directory).
    pub fn model_dir(&self) -> &Path {
        self.model_dirs
            .first()
            .map_or(Path::new(""), PathBuf::as_path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Clone)]
    struct One;
    impl Part for One {
        const MODEL_DIR_ENV: &'static str = "EMBER_TEST_ONE_MODEL_DIR";
        const MODEL_DIR_HELP: &'static str = "The model directory";
        const MODEL_NAME_ENV: &'static str = "EMBER_TEST_ONE_MODEL_NAME";
        const ADMIN_ADDR_ENV: &'static str = "EMBER_TEST_ONE_ADMIN_ADDR";
        const ADMIN_ADDR_DEFAULT: &'static str = "127.0.0.1:9100";
        const MANY_MODELS: bool = false;
    }

    #[derive(Debug, Clone)]
    struct Many;
    impl Part for Many {
        const MODEL_DIR_ENV: &'static str = "EMBER_TEST_MANY_MODEL_DIRS";
        const MODEL_DIR_HELP: &'static str = "Model directories; repeat or comma-separate";
        const MODEL_NAME_ENV: &'static str = "EMBER_TEST_MANY_MODEL_NAME";
        const ADMIN_ADDR_ENV: &'static str = "EMBER_TEST_MANY_ADMIN_ADDR";
        const ADMIN_ADDR_DEFAULT: &'static str = "127.0.0.1:9200";
        const MANY_MODELS: bool = true;
    }

    #[derive(Debug, Parser)]
    struct Cli<P: Part> {
        #[command(flatten)]
        model: ModelArgs<P>,
    }

    #[test]
    fn a_one_model_part_takes_one_directory_and_its_own_defaults() {
        let args = Cli::<One>::try_parse_from(["x"]).unwrap().model;
        assert_eq!(args.model_dir(), Path::new(DEFAULT_MODEL_DIR));
        assert_eq!(args.model_name, None);
        assert_eq!(args.admin_addr, "127.0.0.1:9100".parse().unwrap());
        let args = Cli::<One>::try_parse_from(["x", "--model-dir", "a,b", "--model-name", "m"])
            .unwrap()
            .model;
        assert_eq!(args.model_dirs, [PathBuf::from("a,b")]);
        assert_eq!(args.model_name.as_deref(), Some("m"));
        assert!(Cli::<One>::try_parse_from(["x", "--model-dir", "a", "--model-dir", "b"]).is_err());
    }

    #[test]
    fn a_many_model_part_takes_repeated_or_comma_separated_directories() {
        let args = Cli::<Many>::try_parse_from(["x"]).unwrap().model;
        assert_eq!(args.model_dirs, [PathBuf::from(DEFAULT_MODEL_DIR)]);
        assert_eq!(args.admin_addr, "127.0.0.1:9200".parse().unwrap());
        let args = Cli::<Many>::try_parse_from([
            "x",
            "--model-dir",
            "a,b",
            "--model-dir",
            "c",
            "--admin-addr",
            "0.0.0.0:1",
        ])
        .unwrap()
        .model;
        assert_eq!(args.model_dirs, ["a", "b", "c"].map(PathBuf::from));
        assert_eq!(args.admin_addr, "0.0.0.0:1".parse().unwrap());
    }

    #[test]
    fn each_part_names_its_own_variables() {
        use clap::CommandFactory;
        let command = Cli::<Many>::command();
        let env = |id: &str| {
            let arg = command.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_env().unwrap().to_str().unwrap().to_string()
        };
        assert_eq!(env("model_dirs"), "EMBER_TEST_MANY_MODEL_DIRS");
        assert_eq!(env("model_name"), "EMBER_TEST_MANY_MODEL_NAME");
        assert_eq!(env("admin_addr"), "EMBER_TEST_MANY_ADMIN_ADDR");
    }
}
