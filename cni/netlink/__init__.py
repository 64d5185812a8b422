"""The netlink wire format (pure, stdlib only): walking messages and attributes (`netlink_parse`) and the
nf_tables messages and expressions a batch is made of (`nft_messages`). Shared by the CNI plugin and the
agent; nothing here opens a socket."""
