//! The configuration reference lists every flag and key, so it cannot
//! drift from the code.

use clap::CommandFactory;

#[test]
fn configuration_reference_covers_every_flag_and_key() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md")).unwrap();
    let keys = dewy_cli::keys();
    assert!(keys.len() > 20, "the keys come from the flags: {keys:?}");
    for dewy_cli::Key { name: key, flag, .. } in keys {
        if key != "command" {
            assert!(
                doc.contains(&format!("| `{flag}` |")),
                "docs/configuration.md lacks the flag {flag}"
            );
        }
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/configuration.md lacks the key {key}"
        );
    }
    let cli = dewy_cli::Cli::command();
    for sub in cli.get_subcommands() {
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    doc.contains(&format!("`--{long}`")),
                    "docs/configuration.md lacks --{long} of `dewy {}`",
                    sub.get_name()
                );
            }
            if let Some(short) = arg.get_short() {
                assert!(
                    doc.contains(&format!("`-{short}`")),
                    "docs/configuration.md lacks -{short}"
                );
            }
        }
    }
}
