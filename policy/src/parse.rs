//! Policy text → typed model, strictly, with every error reported as FILE:LINE:COLUMN.
