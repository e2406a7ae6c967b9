//! The instance id sent with every batch: the Envoy node id, `/`, and a
//! random suffix made when the VM starts, so a restarted VM starts a new
//! sequence.

/// Maximum length of the node-id part of an instance id, in bytes. The
/// sidecar rejects instance ids longer than 256 bytes, and a rejected batch
/// would be resent forever, so the node id is cut to leave room for the
/// suffix.
pub const MAX_NODE_ID_BYTES: usize = 200;

/// Builds the instance id from the node id and a random suffix. Control
/// characters in the node id become `_`, because the sidecar rejects them,
/// and a node id longer than [`MAX_NODE_ID_BYTES`] is cut at a character
/// boundary.
pub fn instance_id(node_id: &str, suffix: &str) -> String {
    let mut id = String::with_capacity(node_id.len().min(MAX_NODE_ID_BYTES) + 1 + suffix.len());
    for character in node_id.chars() {
        let character = if character.is_control() {
            '_'
        } else {
            character
        };
        if id.len() + character.len_utf8() > MAX_NODE_ID_BYTES {
            break;
        }
        id.push(character);
    }
    id.push('/');
    id.push_str(suffix);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_node_id_is_kept() {
        assert_eq!(instance_id("edge-1", "00ff"), "edge-1/00ff");
        assert_eq!(instance_id("", "00ff"), "/00ff");
    }

    #[test]
    fn long_node_id_is_cut_to_fit_the_sidecar() {
        let suffix = "0123456789abcdef";
        let id = instance_id(&"n".repeat(1000), suffix);
        assert_eq!(id.len(), MAX_NODE_ID_BYTES + 1 + suffix.len());
        assert!(id.len() <= 256);
        assert!(id.ends_with("/0123456789abcdef"), "{id}");

        // A cut never splits a multi-byte character.
        let id = instance_id(&"é".repeat(150), suffix);
        let node = id.strip_suffix("/0123456789abcdef").unwrap();
        assert_eq!(node, "é".repeat(100));
    }

    #[test]
    fn control_characters_are_replaced() {
        let id = instance_id("edge\n1\t\u{1b}[31m", "ab");
        assert_eq!(id, "edge_1__[31m/ab");
    }
}
