"""Configuration of a MiniMoE encoder (written into exported folders; see modeling_minimoe.py).

BERT's configuration keys, plus the mixture: ``num_experts`` minimal experts per FFN, each of
``intermediate_size``, top-1 routed by ``router``. Keys that only matter to training (``drop_tokens``,
``moefy_shared_fraction``, ...) are kept as plain attributes so a folder round-trips.
"""
try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class MiniMoEConfig(PreTrainedConfig):
    model_type = "minimoe"

    def __init__(self, vocab_size=30522, hidden_size=384, num_hidden_layers=4, num_attention_heads=12,
                 intermediate_size=1536, num_experts=4, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, gate_noise=0.1, route_padding=False,
                 max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, initializer_range=0.02,
                 pad_token_id=0, classifier_dropout=None, router="learned", router_seed=0, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.gate_noise = gate_noise
        self.route_padding = route_padding
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.classifier_dropout = classifier_dropout
        self.router = router  # learned (a gate), random or hash (a fixed integer hash, no gate)
        self.router_seed = router_seed
