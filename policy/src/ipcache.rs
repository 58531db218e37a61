//! The ipcache: prefix → identity, as the datapath sees it.
