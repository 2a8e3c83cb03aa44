//! Request `envs` (`KEY=VALUE`) of SnapshotBackup and BackupRestore, turned into the credential
//! map of that one call. The process environment is never touched (Longhorn's Go proxy called
//! `os.Setenv`, GHSA-wgh7-5vxp-4qr4), and only the keys Longhorn documents are accepted.

use std::collections::HashMap;

use tonic::Status;

/// The credential keys of longhorn-engine's `GetBackupCredential` (spec §5.3).
pub const CREDENTIAL_KEYS: [&str; 8] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINTS",
    "AWS_CERT",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "VIRTUAL_HOSTED_STYLE",
];

/// Known to longhorn-manager (IAM role via pod annotation); accepted, not passed on.
const MANAGER_ONLY_KEYS: [&str; 1] = ["AWS_IAM_ROLE_ARN"];

/// Read by the AWS SDK itself (spec §2.5); the backup-target RPCs, which talk to S3 from lhnet,
/// take them from `envs` too. Not passed on to engines, whose credential map has no place
/// for them.
pub const TARGET_ONLY_KEYS: [&str; 2] = ["AWS_SESSION_TOKEN", "AWS_REGION"];

/// Parses `envs` into the credential map passed on to an engine, refusing malformed entries
/// and unknown keys.
pub fn credential_map(envs: &[String]) -> Result<HashMap<String, String>, Status> {
    parse(envs, &[])
}

/// As [`credential_map`], for the backup-target RPCs: also [`TARGET_ONLY_KEYS`].
pub fn target_credentials(envs: &[String]) -> Result<HashMap<String, String>, Status> {
    parse(envs, &TARGET_ONLY_KEYS)
}

fn parse(envs: &[String], extra: &[&str]) -> Result<HashMap<String, String>, Status> {
    let mut map = HashMap::new();
    for (i, entry) in envs.iter().enumerate() {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(Status::invalid_argument(format!(
                "envs[{i}] is not KEY=VALUE"
            )));
        };
        if MANAGER_ONLY_KEYS.contains(&key) {
            continue;
        }
        if !CREDENTIAL_KEYS.contains(&key) && !extra.contains(&key) {
            return Err(Status::invalid_argument(format!(
                "envs[{i}]: key {key:?} is not accepted; allowed keys: {}",
                CREDENTIAL_KEYS
                    .iter()
                    .chain(extra)
                    .chain(MANAGER_ONLY_KEYS.iter())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        map.insert(key.to_string(), value.to_string());
    }
    let access = map.contains_key("AWS_ACCESS_KEY_ID");
    let secret = map.contains_key("AWS_SECRET_ACCESS_KEY");
    if access != secret {
        return Err(Status::invalid_argument(
            "envs: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be given together",
        ));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn accepts_documented_keys_only() {
        let envs = vec![
            "AWS_ACCESS_KEY_ID=a".to_string(),
            "AWS_SECRET_ACCESS_KEY=b=c".into(),
            "AWS_IAM_ROLE_ARN=r".into(),
        ];
        let map = credential_map(&envs).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map["AWS_SECRET_ACCESS_KEY"], "b=c");

        let err = credential_map(&["LD_PRELOAD=/tmp/x.so".into()]).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("\"LD_PRELOAD\" is not accepted"),
            "{err:?}"
        );
        assert!(credential_map(&["NOEQUALS".into()])
            .unwrap_err()
            .message()
            .contains("envs[0]"));
        assert!(credential_map(&["AWS_ACCESS_KEY_ID=a".into()]).is_err());
        assert!(std::env::var_os("LD_PRELOAD").is_none());
        let region = ["AWS_REGION=eu-west-1".to_string()];
        assert!(
            credential_map(&region).is_err(),
            "engines get no AWS_REGION"
        );
        assert_eq!(
            target_credentials(&region).unwrap()["AWS_REGION"],
            "eu-west-1"
        );
    }
}
