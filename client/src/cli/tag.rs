//! `delta tag REF TAG [--expect VERSION]`.

use anyhow::Context;
use serde_json::json;

use super::Ctx;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The version to tag.
    pub reference: String,
    /// The tag.
    pub tag: String,
    /// Only move the tag if it currently points at this version (`v3`, or `none` for a new tag).
    #[arg(long)]
    pub expect: Option<String>,
}

/// Tags.
pub async fn run(args: Args, ctx: &Ctx) -> anyhow::Result<()> {
    let expected = match args.expect.as_deref() {
        None => None,
        Some("none") => Some(0),
        Some(v) => Some(
            delta_proto::reference::parse_version(v)
                .with_context(|| format!("--expect {v:?}: use v<N> or none"))?,
        ),
    };
    let (version, previous) = ctx
        .remote()
        .await?
        .set_tag(&args.reference, &args.tag, expected)
        .await
        .with_context(|| format!("cannot tag {} as {}", args.reference, args.tag))?;
    if ctx.json {
        return ctx.print_json(
            &json!({"tag": args.tag, "version": version, "previous_version": previous}),
        );
    }
    let prev = if previous == 0 {
        "new".to_owned()
    } else {
        format!("was v{previous}")
    };
    println!("{} -> v{version} ({prev})", args.tag);
    Ok(())
}
