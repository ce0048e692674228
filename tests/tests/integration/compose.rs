//! compose.yaml names only files and binaries that exist.

use anyhow::Result;
use baton_tests::harness::trial;
use libtest_mimic::Trial;

pub fn trials() -> Vec<Trial> {
    crate::trials![compose_names_only_files_and_binaries_that_exist]
}

async fn compose_names_only_files_and_binaries_that_exist() -> Result<()> {
    baton_tests::compose::check(&baton_tests::repo_root())
}
