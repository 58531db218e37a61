//! A deliberately simple reference evaluator: decides a flow straight from the rules.
